"""Stage 5, quantize: the one f16 GGUF -> every type in `quant_types`, in-process through llama-cpp-python.

Quantizing from f16 (never from another quant) keeps each file one rounding away from the merged weights.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

from .common import BuildError, human_bytes, log, usable_cpus
from .recipe import QUANT_FTYPES, Recipe


class _CaptureLlamaLog:
    """Route llama.cpp's log into a list while quantizing (hundreds of per-tensor lines), then restore
    llama-cpp-python's own handler. The log is where K-quant fallbacks are reported."""

    def __enter__(self):
        import llama_cpp

        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            self.lines.append(text.decode("utf-8", errors="replace"))

        self._callback = callback  # must stay referenced while C holds the pointer
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        import llama_cpp
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    @property
    def text(self) -> str:
        return "".join(self.lines)


def quantize_file(src: Path, dst: Path, quant_type: str, threads: int = 0, log_file: Path | None = None) -> dict:
    """One llama_model_quantize call; writes through a temp name so a killed run leaves no half file behind.
    threads <= 0: every CPU this process may use (llama.cpp's own default counts the whole machine). log_file:
    where llama.cpp's log of the call goes (one line per tensor, fallbacks included)."""
    import llama_cpp

    if quant_type not in QUANT_FTYPES:
        raise BuildError(f"unknown quant type '{quant_type}' (valid: {', '.join(QUANT_FTYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant_type]
    params.nthread = threads if threads > 0 else usable_cpus()
    tmp = dst.with_name(dst.name + ".tmp")
    with _CaptureLlamaLog() as captured:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(captured.text, encoding="utf-8")
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        err = [ln for ln in captured.text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()][-1:]
        raise BuildError(f"llama_model_quantize {quant_type} failed (code {rc}){': ' + err[0].strip() if err else ''}")
    os.replace(tmp, dst)
    # K-quants need rows divisible by 256; llama.cpp silently uses an older type for the others. Say how many.
    m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", captured.text)
    return {"fallback_tensors": int(m.group(1)) if m else 0, "tensors": int(m.group(2)) if m else None}


def run(recipe: Recipe, f16: Path, gguf_dir: Path) -> tuple[dict, list[Path]]:
    from tqdm.auto import tqdm

    wanted = {gguf_dir / f"{recipe.gguf_name}-{q}.gguf" for q in recipe.quant_types}
    for stale in gguf_dir.glob(f"{recipe.gguf_name}-*.gguf"):  # a type dropped from the recipe
        if stale != f16 and stale not in wanted:
            stale.unlink()
    files, types = [], {}
    for q in tqdm(recipe.quant_types, desc="quantize", unit="type"):
        out = gguf_dir / f"{recipe.gguf_name}-{q}.gguf"
        # The log goes beside convert.log, not into gguf/ (which holds only model files).
        info = quantize_file(f16, out, q, log_file=gguf_dir.parent / ".stages" / f"quantize-{q}.log")
        size = out.stat().st_size
        note = (
            f", {info['fallback_tensors']} tensors fell back (rows not divisible by 256)"
            if info["fallback_tensors"]
            else ""
        )
        log(f"[quantize] {out.name}: {human_bytes(size)}{note}")
        types[q] = {"file": out.name, "bytes": size, **info}
        files.append(out)
    return {"types": types}, files
