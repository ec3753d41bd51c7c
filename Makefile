# CPU set-up, demo, tests and benchmarks in a project virtualenv (.venv). Every target installs
# what it needs first (scripts/setup.sh; idempotent). PY picks the interpreter that creates .venv;
# TORCH_INDEX_URL where CPU torch comes from (default the PyTorch CPU wheel index).
PY ?= python3
VENV ?= .venv
export PY VENV TORCH_INDEX_URL TORCH_VERSION VLLM
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(VENV)/.setup-run: setup.py scripts/setup.sh
	bash scripts/setup.sh run
	touch $@

$(VENV)/.setup-dev: setup.py requirements-cpu.txt scripts/setup.sh
	bash scripts/setup.sh dev
	touch $@ $(VENV)/.setup-run

demo: $(VENV)/.setup-run
	$(BIN)/racro-fast demo $(ARGS)

test: $(VENV)/.setup-dev
	$(BIN)/python -P -m pytest -q tests $(ARGS)

bench: $(VENV)/.setup-dev
	$(BIN)/python benchmarks/bench_fused_linear_logprob.py
	$(BIN)/python benchmarks/bench_logprob_from_logits.py
	$(BIN)/python benchmarks/bench_grpo_loss.py

clean:
	rm -rf runs build *.egg-info $(VENV)
