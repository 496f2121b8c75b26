"""llama.cpp's CPU variants: every process registers the fastest one *proven* to run on this machine, and never one
whose instructions trap (SIGILL), such as AMX on VMs that list it in CPUID and /proc/cpuinfo yet cannot run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ggufchat import cpu_backend as cpu
from ggufchat.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
AVX512_VNNI_BF16 = set(cpu.VARIANTS["zen4"].flags)
ALL = list(cpu.VARIANTS)


@pytest.fixture(scope="module")
def installed() -> tuple[Path, dict[str, Path]]:
    """(libllama, {variant: library}) of the installed llama-cpp-python."""
    import llama_cpp

    package = Path(llama_cpp.__file__).resolve().parent
    libraries = {p.name.removeprefix("libggml-cpu-").removesuffix(".so"): p
                 for p in (package.parent / "bin").glob("libggml-cpu-*.so")}
    if not libraries:
        pytest.skip("this llama-cpp-python build has its CPU code linked in (no variants)")
    return package / "lib" / "libllama.so", libraries


@pytest.fixture(scope="module")
def trapping_library(tmp_path_factory) -> Path:
    """A CPU-variant library whose CPUID test says yes and whose first instruction traps: `ud2`, which raises SIGILL
    on every x86 machine, standing in for the AMX `tilezero` that raises it only on some VMs."""
    if not shutil.which("cc"):
        pytest.fail("a C compiler is needed (tests/setup.sh installs one to build llama-cpp-python)")
    folder = tmp_path_factory.mktemp("trap")
    source = folder / "trap.c"
    source.write_text("int ggml_backend_score(void) { return 1 << 20; }\n"
                      "void *ggml_backend_init(void) { __builtin_trap(); }\n")
    library = folder / "libggml-cpu-sapphirerapids.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def test_candidates_are_llamas_best_first_among_variants_whose_flags_the_os_lists():
    amx = AVX512_VNNI_BF16 | {"amx_tile", "amx_int8"}
    assert cpu.candidates(ALL, amx)[:3] == ["sapphirerapids", "zen4", "cooperlake"]  # the probe decides between them
    assert cpu.candidates(ALL, AVX512_VNNI_BF16)[0] == "zen4"  # AMX not listed: never tried
    assert cpu.candidates(ALL, set(cpu.VARIANTS["alderlake"].flags))[:2] == ["alderlake", "haswell"]
    assert cpu.candidates(ALL, {"sse4_2"}) == ["sse42", "x64"]
    # Unknown variants: never where the flags are known (what they need cannot be checked); last where they are not.
    assert "futurelake" not in cpu.candidates(["haswell", "futurelake"], set(cpu.VARIANTS["haswell"].flags))
    assert cpu.candidates(["futurelake", "haswell"], None) == ["haswell", "futurelake"]


def test_the_variant_table_matches_the_installed_libraries(installed):
    """Each variant this machine's flags admit, probed in its own child: it runs and computes right here, and its
    ggml_backend_score() is the score the table ranks it by. A llama.cpp upgrade that adds or changes a variant fails
    here until the table follows. The one verdict allowed besides "runs": on the microVMs that list AMX yet trap on
    it, the AMX variant dies by SIGILL (the bug the probe exists for), and then the loader must pick another."""
    libllama, libraries = installed
    assert set(libraries) <= set(cpu.VARIANTS), set(libraries) - set(cpu.VARIANTS)
    flags = cpu.os_cpu_flags()
    runnable = [n for n in libraries if flags is None or cpu.VARIANTS[n].flags <= flags]
    assert "x64" in runnable
    amx_trap = ("sapphirerapids", "its AMX instructions trap on this machine (SIGILL)")
    trapped = False
    for name in runnable:
        score, why = cpu.probe(libllama, libraries[name])
        if (name, why) == amx_trap:
            trapped = True
            continue
        assert why is None, (name, why)
        assert score in (0, cpu.VARIANTS[name].score), (name, score)  # 0: a CPUID bit the flags did not show
    if trapped:
        choice = cpu.choose_cpu_variant(libllama, libraries, flags, cache=None)
        assert choice.name != "sapphirerapids" and amx_trap in choice.skipped


def test_a_variant_that_traps_is_skipped_and_the_next_one_runs(installed, trapping_library, tmp_path):
    libllama, libraries = installed
    score, why = cpu.probe(libllama, trapping_library)  # a real child, really killed by the signal
    assert (score, why) == (None, "its AMX instructions trap on this machine (SIGILL)")

    # The machine of the bug: the flags list AMX (and AVX-512), and the AMX variant's instructions trap.
    flags = (cpu.os_cpu_flags() or set()) | cpu.VARIANTS["sapphirerapids"].flags
    with_trap = {**libraries, "sapphirerapids": trapping_library}
    choice = cpu.choose_cpu_variant(libllama, with_trap, flags, cache=None)
    best_here = cpu.choose_cpu_variant(libllama, {n: p for n, p in libraries.items() if n != "sapphirerapids"},
                                       cpu.os_cpu_flags(), cache=None)
    assert choice.name == best_here.name != "sapphirerapids"
    assert choice.skipped == (("sapphirerapids", "its AMX instructions trap on this machine (SIGILL)"),)
    assert str(choice).startswith(f"{choice.name} (probed in ")
    assert "sapphirerapids skipped: its AMX instructions trap on this machine" in str(choice)


def test_the_verdict_is_cached_per_machine_and_library_build(installed, trapping_library, tmp_path):
    libllama, libraries = installed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, path in libraries.items():
        shutil.copy(trapping_library if name == "sapphirerapids" else path, bin_dir / path.name)
    copies = {n: bin_dir / p.name for n, p in libraries.items()}
    flags = (cpu.os_cpu_flags() or set()) | cpu.VARIANTS["sapphirerapids"].flags
    cache = tmp_path / "cache"

    first = cpu.choose_cpu_variant(libllama, copies, flags, cache)
    again = cpu.choose_cpu_variant(libllama, copies, flags, cache)
    assert first.how == "probed" and again.how.startswith("cached in ")
    assert (again.name, again.skipped) == (first.name, first.skipped)
    assert [p.name for p in cache.iterdir()] == [Path(again.how.removeprefix("cached in ")).name]

    os.utime(copies["x64"], ns=(1, 1))  # another build of the libraries: probed again, and cached beside
    rebuilt = cpu.choose_cpu_variant(libllama, copies, flags, cache)
    assert rebuilt.how == "probed" and len(list(cache.iterdir())) == 2
    saved = Path(cpu.choose_cpu_variant(libllama, copies, flags, cache).how.removeprefix("cached in "))
    saved.write_text("{not json")  # a damaged verdict is probed over, never trusted
    assert cpu.choose_cpu_variant(libllama, copies, flags, cache).how == "probed"
    assert cpu.choose_cpu_variant(libllama, copies, flags, cache).how == f"cached in {saved}"


def test_an_operator_can_choose_the_variant_but_not_one_that_cannot_run(installed, trapping_library):
    libllama, libraries = installed
    assert cpu.choose_cpu_variant(libllama, libraries, None, None, forced="x64").name == "x64"
    assert str(cpu.choose_cpu_variant(libllama, libraries, None, None, forced="x64")).startswith(
        "x64 (set by LLAMA_CPU_VARIANT")
    with pytest.raises(ConfigError, match=r"LLAMA_CPU_VARIANT=sapphirerapids cannot run on this machine "
                                          r"\(sapphirerapids: its AMX instructions trap"):
        cpu.choose_cpu_variant(libllama, {**libraries, "sapphirerapids": trapping_library}, None, None,
                               forced="sapphirerapids")
    with pytest.raises(ConfigError, match="LLAMA_CPU_VARIANT='zen5' is not installed; this build has alderlake"):
        cpu.choose_cpu_variant(libllama, libraries, None, None, forced="zen5")


PROBE = r"""
import json, sys
import llama_cpp
from ggufchat import cpu_backend
choice = cpu_backend.load_cpu_backend()
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=1, verbose=False)
out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
print(json.dumps({"name": choice.name, "line": str(choice), "system_info": llama_cpp.llama_print_system_info().decode(),
                  "text": out, "again": cpu_backend.load_cpu_backend() is choice}))
"""


def fresh_process(model: Path, cwd: Path, **env) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(model)], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE",
                               "XDG_CACHE_HOME": str(cwd / "cache"), **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_fresh_process_registers_the_best_variant_and_runs_a_k_quant_model(tmp_path, smollm2_gguf, tiny_phi3_gguf):
    """In a new process, as the Space starts: the variant is the best one whose probe passes, llama.cpp then computes
    with its instructions, and K-quant models (where the AMX trap struck) generate; the second start reads the
    verdict from the cache."""
    expected = None
    for model in (smollm2_gguf, tiny_phi3_gguf["Q4_K_M"]):
        run = fresh_process(model, tmp_path)
        assert run["again"]  # registered once per process
        if run["name"] == cpu.BUILT_IN:
            continue
        if expected is None:
            assert "(probed in " in run["line"]
            import llama_cpp

            bin_dir = Path(llama_cpp.__file__).resolve().parents[1] / "bin"
            libllama = bin_dir.parent / "llama_cpp" / "lib" / "libllama.so"
            expected = next(n for n in cpu.candidates([p.name[12:-3] for p in bin_dir.glob("libggml-cpu-*.so")],
                                                      cpu.os_cpu_flags())
                            if cpu.probe(libllama, bin_dir / f"libggml-cpu-{n}.so")[0])
        else:
            assert "(cached in " in run["line"]
        assert run["name"] == expected
        uses_avx512 = "AVX512" in cpu.VARIANTS[run["name"]].features
        assert ("AVX512 = 1" in run["system_info"]) == uses_avx512, run["system_info"]
        if model == smollm2_gguf:  # a real model answers; the tiny random one only has to run without trapping
            assert run["text"].strip()


def test_llama_cpu_variant_chooses_for_a_whole_process(tmp_path, smollm2_gguf):
    if cpu.os_cpu_flags() is not None and not cpu.VARIANTS["haswell"].flags <= cpu.os_cpu_flags():
        pytest.skip("this CPU cannot run the haswell variant")
    run = fresh_process(smollm2_gguf, tmp_path, LLAMA_CPU_VARIANT="haswell")
    if run["name"] == cpu.BUILT_IN:
        pytest.skip("this llama-cpp-python build has its CPU code linked in")
    assert run["name"] == "haswell" and run["line"].startswith("haswell (set by LLAMA_CPU_VARIANT")
    assert "AVX2 = 1" in run["system_info"] and "AVX512 = 1" not in run["system_info"]
    assert run["text"].strip()


QUANTIZE = r"""
import sys
from pathlib import Path
from oasstbuild.quantize import quantize_file
quantize_file(Path(sys.argv[1]), Path(sys.argv[2]), "Q4_K_M")
print(sorted({line.split("/")[-1] for line in open("/proc/self/maps") if "libggml" in line}))
"""


def test_the_builds_quantize_stage_runs_no_cpu_variant(tmp_path, tiny_phi3_gguf):
    """The build quantizes before anything registers a CPU variant: llama.cpp's quantizer lives in libggml-base,
    compiled for plain x86-64, so no variant (and no AMX) is even loaded in that process."""
    out = tmp_path / "q.gguf"
    done = subprocess.run([sys.executable, "-c", QUANTIZE, str(tiny_phi3_gguf["F16"]), str(out)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'build'}"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.strip().splitlines()[-1]
    assert "libggml-base" in loaded and "libggml-cpu" not in loaded, loaded
    assert out.stat().st_size > 0
