"""Stage 4, export: merged HF folder -> one f16 GGUF with llama.cpp's `convert_hf_to_gguf.py`.

The converter must come from the same llama.cpp as the runtime that will read the file: it is a small driver over
its own `conversion/` package and `gguf-py/` (PyPI `gguf` does not work with it). By default it is taken from the
llama-cpp-python source distribution of the installed version, fetched once with pip into the cache dir;
`llama_cpp_dir` points at a checkout instead.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .architectures import get_arch
from .common import BuildError, cache_dir, fresh_dir, human_bytes, log
from .recipe import Recipe

# What the converter needs from vendor/llama.cpp (the rest of the 76 MB sdist is C++ sources).
CONVERTER_PARTS = (
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",
    "conversion/",
    "gguf-py/",
    "models/templates/",
    "LICENSE",
)


def runtime_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError("llama-cpp-python is not installed (pip install -r build/requirements.txt)") from None


def converter_id(recipe: Recipe) -> str:
    """What the export's output depends on besides the merged model: the converter's source. With llama_cpp_dir
    llama-cpp-python need not be installed (a GPU box that only exports)."""
    if recipe.llama_cpp_dir:
        return f"dir:{Path(recipe.llama_cpp_dir).expanduser().resolve()}"
    return runtime_version()


def fetch_sdist(version: str, dest: Path) -> Path:
    """The llama-cpp-python sdist of `version`, downloaded once (pip, PyPI) and kept in `dest`."""
    tarball = dest / f"llama_cpp_python-{version}.tar.gz"
    if tarball.is_file():
        return tarball
    dest.mkdir(parents=True, exist_ok=True)
    log(f"[export] fetching llama-cpp-python=={version} sources with pip (once; cached in {dest})")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={version}",
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not got:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"could not download the llama-cpp-python {version} sdist with pip: {last}")
        shutil.move(got[0], tarball)
    return tarball


def converter_dir(recipe: Recipe) -> Path:
    """A directory holding convert_hf_to_gguf.py and what it imports."""
    if recipe.llama_cpp_dir:
        return Path(recipe.llama_cpp_dir).expanduser().resolve()
    version = runtime_version()
    target = cache_dir() / f"llama.cpp-{version}"
    if (target / ".complete").is_file():
        return target
    tarball = fetch_sdist(version, cache_dir())
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".extract-"))
    try:
        with tarfile.open(tarball) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(CONVERTER_PARTS)
            ]
            if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
                raise BuildError(f"{tarball.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(tmp, members=members, filter="data")
        (tmp / ".complete").write_text(version)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run(recipe: Recipe, merged_dir: Path, gguf_dir: Path) -> tuple[dict, list[Path]]:
    import json

    model_type = json.loads((merged_dir / "config.json").read_text())["model_type"]
    get_arch(model_type).check_gguf_name(recipe.gguf_name)
    conv = converter_dir(recipe)
    fresh_dir(gguf_dir)
    out = gguf_dir / f"{recipe.gguf_name}-f16.gguf"
    cmd = [
        sys.executable,
        str(conv / "convert_hf_to_gguf.py"),
        str(merged_dir),
        "--outfile",
        str(out),
        "--outtype",
        "f16",
        "--model-name",
        recipe.gguf_name,
    ]
    log(f"[export] {conv / 'convert_hf_to_gguf.py'} -> {out.name}")
    logfile = gguf_dir.parent / ".stages" / "convert.log"  # not in gguf/: that folder holds only model files
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not out.is_file():
        tail = [ln for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        raise BuildError(f"convert_hf_to_gguf.py failed (exit {proc.returncode}): {tail[0]} (full log: {logfile})")
    size = out.stat().st_size
    log(f"[export] {out.name}: {human_bytes(size)}")
    result = {"file": out.name, "bytes": size, "converter": str(conv), "converter_id": converter_id(recipe)}
    return result, [out]
