"""llama.cpp's CPU code, picked per machine: the fastest variant this CPU *and its OS* can run, registered once per process.

Every process that loads a model calls `load_cpu_backend()` first: the Space, the build's evaluate and quantize
stages, the tests. With a build that has its CPU code linked in, it does nothing.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

# requirements.txt builds llama.cpp's CPU code once per x86 generation, as separate libraries (GGML_BACKEND_DL +
# GGML_CPU_ALL_VARIANTS), so one build runs AVX-512 where the CPU has it and stays safe where it does not. These are
# the Linux /proc/cpuinfo flags each variant's instructions need (variants from llama.cpp's ggml/src/CMakeLists.txt).
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
_AVX512 = (*_HASWELL, "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
CPU_VARIANT_FLAGS = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _HASWELL,
    "alderlake": (*_HASWELL, "avx_vnni"),
    "skylakex": _AVX512,
    "cannonlake": (*_AVX512, "avx512vbmi"),
    "cascadelake": (*_AVX512, "avx512_vnni"),
    "icelake": (*_AVX512, "avx512vbmi", "avx512_vnni"),
    "cooperlake": (*_AVX512, "avx512_vnni", "avx512_bf16"),
    "zen4": (*_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "sapphirerapids": (*_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
}
_cpu_backend: str | None = None  # the variant registered in this process


def os_cpu_flags() -> set[str] | None:
    """The instruction sets the kernel lets processes use (Linux x86 only; None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def pick_cpu_variant(scores: dict[str, int], flags: set[str] | None) -> str | None:
    """The best variant by llama.cpp's own score, among those the OS can run.

    llama.cpp scores a variant by CPUID alone (its own FIXME: "this does not check for OS support"), and some VMs
    advertise AMX without enabling it: the AMX variant would then win and die with SIGILL on the first K-quant
    product. Linux lists in /proc/cpuinfo only what it enabled, so a variant must also find all its flags there;
    an unknown variant is never picked when the flags are known, since what it needs cannot be checked.
    """
    def runnable(name: str) -> bool:
        return flags is None or (name in CPU_VARIANT_FLAGS and set(CPU_VARIANT_FLAGS[name]) <= flags)

    usable = {name: score for name, score in scores.items() if score > 0 and runnable(name)}
    return max(usable, key=usable.get) if usable else None


def load_cpu_backend() -> str:
    """Register llama.cpp's fastest safe CPU variant with the llama.cpp this process uses; returns its name.

    Must run before the first model loads. llama.cpp looks for variant libraries only beside the executable and in
    the working directory; pip installs them in site-packages/bin. A build without variants returns "built-in".
    """
    global _cpu_backend
    if _cpu_backend:
        return _cpu_backend
    import ctypes

    import llama_cpp

    package = Path(llama_cpp.__file__).resolve().parent
    # ggml's functions are looked up through the libllama that llama_cpp loaded, so they come from the very libggml
    # it links (the wheel also holds other copies of libggml, each with its own, empty backend registry).
    ggml = ctypes.CDLL(str(package / "lib" / "libllama.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    if ggml.ggml_backend_dev_by_type(0):  # 0 = GGML_BACKEND_DEVICE_TYPE_CPU: a build with its CPU code linked in
        _cpu_backend = "built-in"
        return _cpu_backend
    libraries = {path.name.removeprefix("libggml-cpu-").removesuffix(".so"): path
                 for path in (package.parent / "bin").glob("libggml-cpu-*.so")}
    scores = {name: ctypes.CDLL(str(path)).ggml_backend_score() for name, path in libraries.items()}
    best = pick_cpu_variant(scores, os_cpu_flags())
    if best is None:
        raise ConfigError(
            f"llama-cpp-python has no CPU backend this machine can run (found: {', '.join(sorted(scores)) or 'none'} "
            f"in {package.parent / 'bin'}): reinstall it with the flags in requirements.txt."
        )
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    if not ggml.ggml_backend_load(str(libraries[best]).encode()):
        raise ConfigError(f"llama.cpp could not load its CPU backend {libraries[best]}.")
    _cpu_backend = best
    return best
