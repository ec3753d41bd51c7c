# CPU set-up, demo, tests and benchmarks in a project virtualenv (.venv), with the C++ CPU kernels
# built into build/cpu (CMakeLists.txt). Every target installs what it needs first
# (scripts/setup.sh; idempotent). PY picks the interpreter that creates .venv;
# TORCH_INDEX_URL where CPU torch comes from (default the PyTorch CPU wheel index).
PY ?= python3
VENV ?= .venv
export PY VENV TORCH_INDEX_URL TORCH_VERSION VLLM
BIN := $(VENV)/bin

CPU_LIB := build/cpu/libracro_fast_cpu.so

.PHONY: demo test test-fast bench bench-compare bench-tables cpu-kernels gpu-check gpu-wheels clean

$(VENV)/.setup-run: setup.py scripts/setup.sh
	bash scripts/setup.sh run
	touch $@

$(VENV)/.setup-dev: setup.py requirements-cpu.txt scripts/setup.sh
	bash scripts/setup.sh dev
	touch $@ $(VENV)/.setup-run

# The C++ CPU kernels, rebuilt when their sources change. A failed build warns and leaves no
# library: CPU tensors then run the torch references (and the next make tries again).
$(CPU_LIB): CMakeLists.txt $(wildcard kernels/cpu/*) | $(VENV)/.setup-run
	bash scripts/setup.sh cpu-kernels

cpu-kernels: $(CPU_LIB)

demo: $(VENV)/.setup-run $(CPU_LIB)
	$(BIN)/racro-fast demo $(ARGS)

test: $(VENV)/.setup-dev $(CPU_LIB)
	$(BIN)/python -P -m pytest -q tests $(ARGS)

# the tests a developer runs between edits: everything but the slow ones (tests/conftest.py says which)
test-fast: $(VENV)/.setup-dev $(CPU_LIB)
	$(BIN)/python -P -m pytest -q tests -m "not slow" $(ARGS)

# the kernels as pytest-benchmark suites (small shapes, a few minutes), saved under .benchmarks/;
# bench-compare: the newest saved run against the one before, on each benchmark's ratio to eager
bench: $(VENV)/.setup-dev $(CPU_LIB)
	$(BIN)/python -P -m pytest -q benchmarks --benchmark-only --benchmark-autosave $(ARGS)

bench-compare:
	$(BIN)/python benchmarks/compare_ratios.py $(ARGS)

# the scripts behind the README's tables: large shapes, CSV rows in benchmarks/results/, plots
bench-tables: $(VENV)/.setup-dev $(CPU_LIB)
	$(BIN)/python benchmarks/bench_fused_linear_logprob.py
	$(BIN)/python benchmarks/bench_fused_linear_grpo.py
	$(BIN)/python benchmarks/bench_logprob_from_logits.py
	$(BIN)/python benchmarks/bench_grpo_loss.py

# On a GPU machine that has torch (CUDA), triton and transformers: no virtualenv, nothing downloaded.
# What it lacks (math-verify and its two dependencies; liger-kernel for the comparisons) comes as
# wheels in .whl/, fetched on a machine with an index by `make gpu-wheels`.
GPU_PY ?= python3
GPU_SITE ?= /tmp/racro_fast_site
gpu-check:
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
		--target $(GPU_SITE) . $(wildcard .whl/*.whl)
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) benchmarks/gpu_check.py $(ARGS)

gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 liger-kernel==0.8.5

clean:
	rm -rf runs build *.egg-info $(VENV)
