#!/usr/bin/env bash
# Wheels that tests/gpu/check.sh installs on a lent GPU machine, which has no registry: fetched here, into the
# git-ignored .gpu-wheels/ at the repo root, for that machine's Python (3.12, x86-64 manylinux). It already has torch,
# transformers, peft, accelerate, huggingface_hub, pyarrow, pandas, xxhash, sentencepiece and protobuf.
# Usage (repo root): bash tests/gpu/fetch_wheels.sh     then carry .gpu-wheels with the device call.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.gpu-wheels
mkdir -p "$dest"
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# The build's pins (build/requirements.txt) for what the GPU image lacks, and what those need that it lacks too
# (datasets: dill, multiprocess).
wanted=(trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 dill multiprocess)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "${wanted[@]}"
# The llama.cpp converter of the installed llama-cpp-python (the GPU image has no llama-cpp-python): check.sh
# passes it as --llama_cpp_dir so the export stage runs there too.
conv=$(python3 -c "import sys; sys.path.insert(0, 'build'); from oasstbuild.export import converter_dir; \
from oasstbuild.recipe import load_recipe; print(converter_dir(load_recipe('smoke')))")
rm -rf "$dest/llama.cpp" && cp -r "$conv" "$dest/llama.cpp"
ls -l "$dest"
du -sh "$dest"
