"""racro_fast: GRPO training of a captioner whose captions a frozen text reasoner must solve from."""
__version__ = "0.1.0"
