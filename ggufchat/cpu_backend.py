"""llama.cpp's CPU code, picked per machine: the fastest variant *proven* to run here, registered once per process.

Every process that loads a model calls `load_cpu_backend()` first: the Space, the build's evaluate stage, the tests,
the benchmarks. requirements.txt builds llama.cpp's CPU code once per x86 generation, as separate libraries
(GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS). llama.cpp would pick one by CPUID alone, and some VMs list AMX in CPUID
and /proc/cpuinfo, grant the tile permission, and still trap on the first tile instruction (SIGILL). So the
candidates, best first, each run a real K-quant product in a child process (`cpu_probe.py`): a trap kills the child,
and the next candidate is tried. The verdict is cached per machine and library build, so a restart pays nothing.

`LLAMA_CPU_VARIANT=zen4` makes that choice for an operator (still probed: a wrong one is refused, not run).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# ggml's x86 features: the /proc/cpuinfo flags each needs and its weight in ggml_backend_score()
# (ggml/src/ggml-cpu/arch/x86/cpu-feats.cpp). AMX_TILE is required by a variant but not scored.
FEATURES = {
    "FMA": (("fma",), 1),
    "F16C": (("f16c",), 1 << 1),
    "SSE42": (("sse4_2",), 1 << 2),
    "BMI2": (("bmi2",), 1 << 3),
    "AVX": (("avx",), 1 << 4),
    "AVX2": (("avx2",), 1 << 5),
    "AVX_VNNI": (("avx_vnni",), 1 << 6),
    "AVX512": (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), 1 << 7),
    "AVX512_VBMI": (("avx512vbmi",), 1 << 8),
    "AVX512_BF16": (("avx512_bf16",), 1 << 9),
    "AVX512_VNNI": (("avx512_vnni",), 1 << 10),
    "AMX_TILE": (("amx_tile",), 0),
    "AMX_INT8": (("amx_int8",), 1 << 11),
}


@dataclass(frozen=True)
class Variant:
    features: tuple[str, ...]
    adds: str  # the instructions it uses that the variants it builds on do not: named when they trap

    @property
    def flags(self) -> frozenset[str]:
        return frozenset(flag for feature in self.features for flag in FEATURES[feature][0])

    @property
    def score(self) -> int:
        """What ggml_backend_score() returns on a CPU that has every feature (0 elsewhere)."""
        return 1 + sum(FEATURES[feature][1] for feature in self.features)


_HASWELL = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2")
_AVX512 = (*_HASWELL, "AVX512")
# The x86 variants of llama.cpp's ggml/src/CMakeLists.txt (ggml_add_cpu_backend_variant), with the same features.
VARIANTS = {
    "x64": Variant((), "x86-64"),
    "sse42": Variant(("SSE42",), "SSE4.2"),
    "sandybridge": Variant(("SSE42", "AVX"), "AVX"),
    "ivybridge": Variant(("SSE42", "AVX", "F16C"), "F16C"),
    "piledriver": Variant(("SSE42", "AVX", "F16C", "FMA"), "FMA"),
    "haswell": Variant(_HASWELL, "AVX2"),
    "alderlake": Variant((*_HASWELL, "AVX_VNNI"), "AVX-VNNI"),
    "skylakex": Variant(_AVX512, "AVX-512"),
    "cannonlake": Variant((*_AVX512, "AVX512_VBMI"), "AVX-512 VBMI"),
    "cascadelake": Variant((*_AVX512, "AVX512_VNNI"), "AVX-512 VNNI"),
    "icelake": Variant((*_AVX512, "AVX512_VBMI", "AVX512_VNNI"), "AVX-512 VBMI/VNNI"),
    "cooperlake": Variant((*_AVX512, "AVX512_VNNI", "AVX512_BF16"), "AVX-512 BF16"),
    "zen4": Variant((*_AVX512, "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"), "AVX-512 BF16"),
    "sapphirerapids": Variant((*_AVX512, "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8"),
                              "AMX"),
}
BUILT_IN = "built-in"  # a llama-cpp-python build with its CPU code linked in: nothing to pick, still probed
PROBE = Path(__file__).with_name("cpu_probe.py")
PROBE_TIMEOUT_S = 120  # ~0.1-0.6 s here; generous for a Space whose other start-up work shares the CPU


@dataclass(frozen=True)
class CpuBackend:
    """The variant this process runs, the better ones skipped and why, and how the verdict was reached."""

    name: str
    skipped: tuple[tuple[str, str], ...] = ()
    how: str = "probed"  # "probed" (children ran it here), "cached" (an earlier probe on this machine), "set by ..."
    seconds: float = field(default=0.0, compare=False)

    def __str__(self) -> str:
        skipped = "".join(f"; {name} skipped: {why}" for name, why in self.skipped)
        how = f"probed in {self.seconds:.1f} s" if self.how == "probed" else self.how
        return f"{self.name} ({how}{skipped})"


def os_cpu_flags() -> set[str] | None:
    """The instruction sets the kernel lists for processes (Linux x86 only; None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def candidates(installed: list[str], flags: set[str] | None) -> list[str]:
    """The variants worth probing, best first by llama.cpp's own score.

    A variant needs all its flags listed by the OS (Linux lists only what it enabled; a VM may still list what traps,
    which the probe then finds). An unknown variant is tried only where the flags are unknown, last, since what it
    needs cannot be checked.
    """
    known = [n for n in installed if n in VARIANTS and (flags is None or VARIANTS[n].flags <= flags)]
    unknown = sorted(n for n in installed if n not in VARIANTS) if flags is None else []
    return sorted(known, key=lambda n: VARIANTS[n].score, reverse=True) + unknown


def probe(libllama: Path, library: Path | str) -> tuple[int | None, str | None]:
    """Run `cpu_probe.py` on one variant in a child process: (its score, None) when it runs and computes right here,
    (None, why not) when it traps, crashes or computes garbage. A score of 0: the variant declines this CPU."""
    name = Path(library).name.removeprefix("libggml-cpu-").removesuffix(".so") if library != BUILT_IN else BUILT_IN
    try:
        done = subprocess.run([sys.executable, "-I", str(PROBE), str(libllama), str(library)], capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    except subprocess.TimeoutExpired:
        return None, f"its probe did not finish in {PROBE_TIMEOUT_S} s"
    if done.returncode == -signal.SIGILL:
        adds = VARIANTS[name].adds if name in VARIANTS else "compiled-in"
        return None, f"its {adds} instructions trap on this machine (SIGILL)"
    if done.returncode < 0:
        return None, f"its probe crashed ({signal.Signals(-done.returncode).name})"
    last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    if done.returncode != 0:
        return None, f"it computes wrong results ({last})" if "wrong results" in last else f"its probe failed ({last})"
    return json.loads(done.stdout.strip().splitlines()[-1])["score"], None


def machine_key(libllama: Path, libraries: dict[str, Path], forced: str | None) -> str:
    """What the verdict depends on: the CPU, what the kernel enables, and the exact libraries."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    libs = [libllama, *(libraries[n] for n in sorted(libraries))]
    facts = {"cpu": cpu or platform.processor(), "flags": sorted(os_cpu_flags() or ()), "kernel": platform.release(),
             "libs": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in libs], "forced": forced}
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ggufchat"


def choose_cpu_variant(libllama: Path, libraries: dict[str, Path], flags: set[str] | None, cache: Path | None,
                       forced: str | None = None) -> CpuBackend:
    """The best variant of `libraries` ({name: path}) whose probe passes here; `libraries` empty: the built-in CPU
    code, probed. Reads and writes the verdict under `cache` (None: no cache). Raises ConfigError when none runs."""
    if forced and forced not in libraries:
        raise ConfigError(f"LLAMA_CPU_VARIANT={forced!r} is not installed; this build has "
                          f"{', '.join(sorted(libraries)) or 'its CPU code built in (unset it)'}.")
    key = machine_key(libllama, libraries, forced)
    saved = cache / f"cpu-variant-{key}.json" if cache else None
    if saved and saved.is_file():
        try:
            verdict = json.loads(saved.read_text())
            return CpuBackend(verdict["name"], tuple(map(tuple, verdict["skipped"])), f"cached in {saved}")
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: probe again and rewrite it
    start = time.perf_counter()
    order = [forced] if forced else candidates(list(libraries), flags) if libraries else [BUILT_IN]
    skipped, declined = [], []
    for name in order:
        score, why = probe(libllama, libraries.get(name, BUILT_IN))
        if why:
            skipped.append((name, why))
        elif score:
            break
        else:
            declined.append((name, "its own CPUID test declines this CPU"))
    else:
        tried = "; ".join(f"{n}: {why}" for n, why in skipped + declined) or "none matches this CPU's flags"
        if forced:
            raise ConfigError(f"LLAMA_CPU_VARIANT={forced} cannot run on this machine ({tried}): unset it, or choose "
                              f"one of {', '.join(sorted(libraries))}.")
        raise ConfigError(f"llama-cpp-python has no CPU code this machine can run ({tried}): reinstall it with the "
                          "flags on its line in requirements.txt (README, 'Installing llama-cpp-python').")
    choice = CpuBackend(name, tuple(skipped), "set by LLAMA_CPU_VARIANT" if forced else "probed",
                        time.perf_counter() - start)
    if saved and not any("did not finish" in why for _, why in skipped):  # a slow start-up is no verdict
        try:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"name": choice.name, "skipped": choice.skipped}))
            tmp.replace(saved)
        except OSError:
            pass  # a read-only home: the next start probes again (a second or so)
    return choice


_lock = threading.Lock()
_loaded: CpuBackend | None = None  # the variant registered in this process


def load_cpu_backend() -> CpuBackend:
    """Register the fastest CPU variant proven to run on this machine with the llama.cpp this process uses.

    Must run before the first model loads. llama.cpp looks for variant libraries only beside the executable and in
    the working directory; pip installs them in site-packages/bin.
    """
    global _loaded
    with _lock:
        if _loaded:
            return _loaded
        import ctypes

        import llama_cpp

        package = Path(llama_cpp.__file__).resolve().parent
        libllama = package / "lib" / "libllama.so"
        # ggml's functions are looked up through the libllama that llama_cpp loaded, so they come from the very
        # libggml it links (the wheel also holds other copies of libggml, each with its own, empty backend registry).
        ggml = ctypes.CDLL(str(libllama))
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        built_in = bool(ggml.ggml_backend_dev_by_type(0))  # 0 = GGML_BACKEND_DEVICE_TYPE_CPU
        libraries = {} if built_in else {
            path.name.removeprefix("libggml-cpu-").removesuffix(".so"): path
            for path in (package.parent / "bin").glob("libggml-cpu-*.so")}
        forced = os.environ.get("LLAMA_CPU_VARIANT", "").strip() or None
        if built_in and forced:
            raise ConfigError(f"LLAMA_CPU_VARIANT={forced} has nothing to choose from: this llama-cpp-python has its "
                              "CPU code built in. Unset it, or reinstall with the flags in requirements.txt.")
        if not built_in and not libraries:
            raise ConfigError(f"llama-cpp-python has no CPU backend in {package.parent / 'bin'}: reinstall it with "
                              "the flags on its line in requirements.txt.")
        choice = choose_cpu_variant(libllama, libraries, os_cpu_flags(), cache_dir(), forced)
        if not built_in:
            ggml.ggml_backend_load.restype = ctypes.c_void_p
            if not ggml.ggml_backend_load(str(libraries[choice.name]).encode()):
                raise ConfigError(f"llama.cpp could not load its CPU backend {libraries[choice.name]}.")
        _loaded = choice
        return choice
