#!/usr/bin/env bash
# Wheels that tests/gpu/check.sh installs on a lent GPU machine, which has no registry: fetched here, into the
# git-ignored .gpu-wheels/ at the repo root, for that machine's Python (3.12, x86-64 manylinux). Its image has torch
# (2.11, CUDA 13.0), accelerate, safetensors, tokenizers, pyarrow, pandas, xxhash and sentencepiece, but transformers
# 5.17 and huggingface_hub 1.33, which the build's pins are not (check.py's gate stops on any such difference).
# Usage (repo root, the venv of README's test set-up active): bash tests/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${DEST:-.gpu-wheels}
python_version=${GPU_PYTHON:-3.12}  # the GPU image's; another only to try the install here
rm -rf "$dest" && mkdir -p "$dest"
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# The build's pins for what the image lacks or has in another version; the rest at the versions this venv resolved:
# dill and multiprocess for datasets (the image has neither).
pinned() { grep -i "^$1==" build/requirements.txt; }
wanted=($(pinned transformers) $(pinned trl) $(pinned peft) $(pinned bitsandbytes) $(pinned datasets)
        $(grep -i '^huggingface_hub==' requirements.txt)
        "dill==$(python3 -c 'import importlib.metadata as m; print(m.version("dill"))')"
        "multiprocess==$(python3 -c 'import importlib.metadata as m; print(m.version("multiprocess"))')")
# huggingface_hub 2 imports httpx2 at import time (which needs httpcore2 and truststore); the image has only httpx.
for dist in httpx2 httpcore2 truststore; do
    wanted+=("$dist==$(python3 -c "import importlib.metadata as m; print(m.version('$dist'))")")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${platforms[@]}" -d "$dest" "${wanted[@]}"
# bitsandbytes ships a library for every CUDA and ROCm release (43 MB packed); the whole carry is limited to 64 MiB.
# Keep the CUDA 13 ones (the image's torch is built for CUDA 13.0; check.py's gate says so if that changes) and CPU.
python3 - "$dest"/bitsandbytes-*.whl <<'PY'
import base64, hashlib, re, sys, zipfile
path = sys.argv[1]
drop = lambda n: re.search(r"libbitsandbytes_(cuda(?!13)\d+|rocm\d+|xpu\d+)\.so$", n)
with zipfile.ZipFile(path) as src:
    items = [(i, src.read(i)) for i in src.infolist() if not drop(i.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):  # the wheel's manifest lists only what it holds
            data = "".join(l + "\n" for l in data.decode().splitlines() if not drop(l.split(",")[0])).encode()
        out.writestr(info, data)
PY
# The llama.cpp converter of the installed llama-cpp-python (the GPU image has no llama-cpp-python): check.py passes
# it as --llama_cpp_dir so the export stage runs there too.
conv=$(python3 -c "import sys; sys.path.insert(0, 'build'); from oasstbuild.export import converter_dir; \
from oasstbuild.recipe import load_recipe; print(converter_dir(load_recipe('smoke')))")
cp -r "$conv" "$dest/llama.cpp"
ls -l "$dest"
du -sh "$dest"
