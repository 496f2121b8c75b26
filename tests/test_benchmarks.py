"""The benchmarks are not part of the suite, but their entry points must keep working: the training one skips
cleanly without CUDA (it is run on lent GPU machines with nothing but carried wheels), the serving one parses."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

BENCH = REPO / "tests" / "benchmarks"


def test_training_benchmark_skips_cleanly_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the benchmark itself")
    done = subprocess.run([sys.executable, str(BENCH / "bench_training.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here" in done.stdout and "Skipped" in done.stdout


def test_training_benchmark_imports_neither_gradio_nor_llama_cpp():
    """The GPU machines have torch and transformers, not the Space's runtime."""
    code = ("import sys; sys.path[:0] = ['tests/benchmarks', 'tests', 'build']; import bench_training, bench_common; "
            "bench_common.phi35_config(); print(sorted(m for m in ('gradio', 'llama_cpp') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_serving_benchmark_parses_its_arguments():
    done = subprocess.run([sys.executable, str(BENCH / "bench_serving.py"), "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "--compare-site" in done.stdout and "--rounds" in done.stdout
