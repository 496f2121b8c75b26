"""llama.cpp's CPU variants: the Space registers the fastest one this machine's OS lets it run, and never one
whose instructions would trap (SIGILL), such as AMX on a VM that advertises it without enabling it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ggufchat import cpu_backend as app  # the loader lives in the serving package

REPO = Path(__file__).resolve().parents[1]

# ggml_backend_score() of each variant on an AVX-512 machine whose CPUID also claims AMX (sapphirerapids scores
# highest there, as it would on the VMs where AMX traps).
SCORES = {"x64": 1, "sse42": 5, "haswell": 63, "alderlake": 127, "skylakex": 191, "cascadelake": 1215,
          "icelake": 1471, "zen4": 1983, "sapphirerapids": 4031}
AVX512_VNNI_BF16 = set(app.CPU_VARIANT_FLAGS["zen4"])


def test_the_os_flags_decide_before_the_score():
    assert app.pick_cpu_variant(SCORES, AVX512_VNNI_BF16) == "zen4"  # AMX not enabled: never sapphirerapids
    assert app.pick_cpu_variant(SCORES, AVX512_VNNI_BF16 | {"amx_tile", "amx_int8"}) == "sapphirerapids"
    assert app.pick_cpu_variant(SCORES, set(app.CPU_VARIANT_FLAGS["alderlake"])) == "alderlake"  # AVX-512 disabled
    assert app.pick_cpu_variant(SCORES, {"sse4_2"}) == "sse42"
    assert app.pick_cpu_variant(SCORES, None) == "sapphirerapids"  # no /proc/cpuinfo flags: llama.cpp's own choice


def test_unknown_or_unsupported_variants_are_never_picked():
    assert app.pick_cpu_variant({"haswell": 63, "futurelake": 9999}, set(app.CPU_VARIANT_FLAGS["haswell"])) == "haswell"
    assert app.pick_cpu_variant({"icelake": 0, "haswell": 0}, AVX512_VNNI_BF16) is None  # CPUID says no to all
    assert app.pick_cpu_variant({}, AVX512_VNNI_BF16) is None


def test_every_variant_this_build_installed_is_known():
    """A llama.cpp upgrade that adds a variant must add its flags here, or the variant is never used."""
    import llama_cpp

    bin_dir = Path(llama_cpp.__file__).resolve().parents[1] / "bin"
    installed = {p.name.removeprefix("libggml-cpu-").removesuffix(".so") for p in bin_dir.glob("libggml-cpu-*.so")}
    if not installed:
        pytest.skip("this llama-cpp-python build has its CPU code linked in (no variants)")
    assert installed <= set(app.CPU_VARIANT_FLAGS), installed - set(app.CPU_VARIANT_FLAGS)


PROBE = r"""
import ctypes, json, sys
from pathlib import Path
import llama_cpp
from ggufchat import cpu_backend as app
name = app.load_cpu_backend()
bin_dir = Path(llama_cpp.__file__).resolve().parents[1] / "bin"
scores = {p.name[len("libggml-cpu-"):-3]: ctypes.CDLL(str(p)).ggml_backend_score() for p in bin_dir.glob("libggml-cpu-*.so")}
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=1, verbose=False)
out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
print(json.dumps({"name": name, "scores": scores, "system_info": llama_cpp.llama_print_system_info().decode(),
                  "text": out, "again": app.load_cpu_backend()}))
"""


def test_a_fresh_process_registers_the_best_variant_and_runs_a_k_quant_model(tmp_path, smollm2_gguf, tiny_phi3_gguf):
    """In a new process, as the Space starts: the variant is the best-scoring one the OS enables, llama.cpp then
    computes with its instructions, and a K-quant model (where the AMX trap struck) generates."""
    for model in (smollm2_gguf, tiny_phi3_gguf["Q4_K_M"]):
        done = subprocess.run([sys.executable, "-c", PROBE, str(model)], cwd=tmp_path, capture_output=True, text=True,
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE"},
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        assert probe["again"] == probe["name"]  # registered once per process
        if probe["name"] == "built-in":
            assert not probe["scores"]
            continue
        flags = app.os_cpu_flags()
        runnable = {n: s for n, s in probe["scores"].items() if set(app.CPU_VARIANT_FLAGS[n]) <= flags and s > 0}
        assert probe["name"] == max(runnable, key=runnable.get), (probe["name"], runnable)
        uses_avx512 = "avx512f" in app.CPU_VARIANT_FLAGS[probe["name"]]
        assert ("AVX512 = 1" in probe["system_info"]) == uses_avx512, probe["system_info"]
        if model == smollm2_gguf:  # a real model answers; the tiny random one only has to run without trapping
            assert probe["text"].strip()
