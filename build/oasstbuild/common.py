"""Small helpers shared by the stages: the error type, output layout, stage markers, atomic writes, logging.

Nothing here imports torch/transformers, so `python build/run.py --help` stays instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ggufchat.files import human_size as human_bytes  # noqa: F401 - one size format for the Space and the build

# Bumped when the on-disk layout of a stage changes, so old markers stop matching.
MARKER_VERSION = 1


class BuildError(Exception):
    """A problem the user can fix (bad recipe, missing file, no token...). run.py prints it on one line and exits 2."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets, Slurm, a container's --cpuset-cpus),
    not os.cpu_count(), which counts the whole machine and oversubscribes a restricted process."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def cache_dir() -> Path:
    """Where downloads that outlive an output dir go (llama.cpp converter sources). Outside the repo on purpose."""
    root = (
        os.environ.get("PHI35_OASST1_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi35-oasst1"
    )
    return Path(root)


@dataclass(frozen=True)
class OutputDir:
    """The layout of one build's output dir. Stages get explicit paths from here, never globals."""

    root: Path

    @property
    def base(self) -> Path:  # the base model when it has to be materialised locally (GGUF package, random init)
        return self.root / "base"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "adapter" / "checkpoints"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"

    @property
    def base_gguf(self) -> Path:  # the base model's GGUFs, scored by evaluate; published only with hub_include_base
        return self.root / "base-gguf"

    @property
    def hub(self) -> Path:  # exactly the folder that is pushed: nothing else may land in it
        return self.root / "hub"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def markers(self) -> Path:  # kept outside hub/ and the artefact folders so they never get uploaded
        return self.root / ".stages"


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    """Write via a temp file + rename: a crash never leaves half a JSON file, and a hard-linked copy is not touched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def fresh_dir(path: Path) -> Path:
    """An empty directory: stages rebuild their folder from scratch so no stale file survives a rerun."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible: a 2.4 GB GGUF need not be stored twice for hub/."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------------------------------
# Stage markers: skip a stage whose outputs are complete and were made from the same inputs
# ---------------------------------------------------------------------------------------------------------------------


def fingerprint(*parts) -> str:
    blob = json.dumps([MARKER_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _file_table(root: Path, files: list[Path]) -> dict[str, int]:
    return {str(Path(f).resolve().relative_to(root.resolve())): Path(f).stat().st_size for f in files}


def read_marker(out: OutputDir, stage: str, fp: str) -> dict | None:
    """The stage's marker if it matches `fp` and every output it lists is still there with the same size."""
    marker = read_json(out.markers / f"{stage}.json")
    if not marker or marker.get("fingerprint") != fp:
        return None
    for rel, size in marker.get("files", {}).items():
        f = out.root / rel
        if not f.is_file() or f.stat().st_size != size:
            return None
    return marker


def write_marker(out: OutputDir, stage: str, fp: str, result: dict, files: list[Path], seconds: float) -> dict:
    # `digest` changes on every completed run, so a forced rerun of a stage invalidates all stages after it.
    marker = {
        "fingerprint": fp,
        "digest": fingerprint(fp, time.time_ns()),
        "seconds": round(seconds, 2),
        "files": _file_table(out.root, files),
        "result": result,
    }
    write_json(out.markers / f"{stage}.json", marker)
    return marker


def drop_marker(out: OutputDir, stage: str) -> None:
    (out.markers / f"{stage}.json").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------------



def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])
