"""The benchmark scripts import each other as top-level modules (`common`, `bench_*`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
