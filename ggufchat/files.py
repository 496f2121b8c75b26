"""Model files: where each GGUF comes from (a local path, or the Hub through the standard HF cache) and whether it is
fit to hand to llama.cpp. A file is checked once per process, before its first load.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    label: str  # what the dropdown shows
    filename: str  # file in `repo`, or a local path when `repo` is None
    repo: str | None = None
    revision: str | None = None  # branch, tag or commit; None = the repo's default branch
    prompt_format: str = "auto"  # a PROMPT_FORMATS key, or "auto": read the GGUF's tokenizer.chat_template


def fetch_model_files(catalog: list[ModelSpec], token: str | None) -> tuple[dict[str, Path], dict[str, str]]:
    """Local path or `hf_hub_download` (standard HF cache, so a Space's `preload_from_hub` is reused).

    With the Hub unreachable, huggingface_hub answers from its cache. Returns (paths, problems) by label.
    """
    from huggingface_hub import hf_hub_download

    paths, problems = {}, {}
    for spec in catalog:
        if spec.repo is None:
            path = Path(spec.filename).expanduser()
            if path.is_file():
                paths[spec.label] = path
            else:
                problems[spec.label] = f"{path} does not exist"
            continue
        try:
            paths[spec.label] = Path(
                hf_hub_download(spec.repo, spec.filename, revision=spec.revision, token=token)
            )
        except Exception as err:  # offline and not cached, gated repo, missing file, ...
            problems[spec.label] = f"{spec.repo}/{spec.filename}: {type(err).__name__}: {str(err).splitlines()[0]}"
    return paths, problems


GGUF_MAGIC = b"GGUF"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_model_file(path: Path, verify_sha256: bool) -> None:
    """Refuse files llama.cpp would choke on, with a message naming the file, before handing them over."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConfigError(f"{path.name} is not a GGUF file (no GGUF header).")
    # In the HF cache, an LFS file is a link to blobs/<sha256 of its content>: a free, offline checksum.
    blob = path.resolve()
    if verify_sha256 and path.is_symlink() and _SHA256.fullmatch(blob.name):
        digest = hashlib.sha256()
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != blob.name:
            # What to do is for the operator (the log); the visitor reads that this model cannot be served.
            print(f"error: {path.name} is corrupt: its sha256 does not match the Hub's; delete {blob} and restart to "
                  "download it again.", file=sys.stderr, flush=True)
            raise ConfigError(f"{path.name} is damaged and cannot be served now; please choose another model.")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
