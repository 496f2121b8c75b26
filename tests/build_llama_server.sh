#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the sdist of the installed llama-cpp-python (the same llama.cpp sources the
# app runs), once, and prints the binary's path as the last line. The tests serve chats through it (BACKEND_URL) and
# tests/benchmarks/bench_parallel.py compares the app against it.
#
#   bash tests/build_llama_server.sh        # ~6 minutes on 2 cores the first time, then instant
#
# Portable: no -march=native (a cached binary must not SIGILL on the next machine); AVX2/FMA/F16C when this CPU has
# them (llama-cpp-python's haswell variant, the same kernels), plain x86-64 otherwise. Never AVX-512 or AMX: some VMs
# list AMX and trap on it, and one static binary cannot fall back the way the app's probed CPU variants do.
# (With GGML_NATIVE=OFF, llama.cpp's CMake turns SSE4.2 ... AVX2 on by default, so "otherwise" must say OFF.)
# Static, no curl (the tests give it local files) and no web UI (the API is all the Space needs).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
# The sdist the build's export stage converts with, from its one fetcher (pip, once), in the build's cache.
tarball=$(PYTHONPATH=.:build python -c 'from oasstbuild.common import cache_dir
from oasstbuild.export import fetch_sdist, runtime_version
print(fetch_sdist(runtime_version(), cache_dir()))')
cache=$(dirname "$tarball")
flags=(-DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release
       -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
haswell=ON
for flag in sse4_2 avx avx2 fma f16c bmi2; do
  [[ "$cpu_flags" == *" $flag "* ]] || haswell=OFF
done
flags+=(-DGGML_SSE42=$haswell -DGGML_AVX=$haswell -DGGML_AVX2=$haswell -DGGML_FMA=$haswell -DGGML_F16C=$haswell
        -DGGML_BMI2=$haswell)
key=$(printf '%s ' "$version" "${flags[@]}" | sha256sum | cut -c1-12)
out="$cache/llama-server-$version-$key"
if [ -x "$out/llama-server" ]; then
  echo "$out/llama-server"
  exit 0
fi

command -v cmake >/dev/null 2>&1 || python -m pip install -q cmake  # PyPI's CMake, into the active venv

work=$(mktemp -d "$cache/llama-server-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xzf "$tarball" -C "$work" "llama_cpp_python-$version/vendor/llama.cpp"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
echo "Compiling llama-server $version (once; ~6 minutes on 2 cores)..." >&2
# Quiet unless it fails (configuring from an sdist warns that there is no git checkout and no web UI).
cmake -S "$src" -B "$work/build" "${flags[@]}" >"$work/configure.log" 2>&1 || { cat "$work/configure.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 || { tail -50 "$work/build.log" >&2; exit 1; }
mkdir -p "$out.tmp"
cp "$work/build/bin/llama-server" "$out.tmp/"
rm -rf "$out" && mv "$out.tmp" "$out"  # whole or not at all: an interrupted build is not taken for a finished one
echo "$out/llama-server"
