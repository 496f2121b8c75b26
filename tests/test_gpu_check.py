"""The GPU check's CPU rehearsal: tests/gpu/check.py's plumbing (version gate, deadline, resume, table), proven here
before a lent GPU spends its 15 minutes on it. A tiny Phi-3 stands in for Phi-3.5-mini; nothing is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

CHECK = REPO / "tests" / "gpu" / "check.py"


def check(tmp_path, *args, timeout=900, env=None) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(CHECK), "--rehearsal", "--out", str(out), "--work",
                           str(tmp_path / "work"), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    results = out / "check.json"
    return done, json.loads(results.read_text()) if results.is_file() else {}


@pytest.mark.slow
def test_the_rehearsal_runs_every_phase_resumes_after_a_kill_and_ends_with_its_table(tmp_path):
    done, results = check(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    phases = results["phases"]
    assert list(phases) == ["gate", "base", "bench", "train", "cpu"]  # install-free: the rehearsal installs nothing
    assert all(p["status"] == "ok" for p in phases.values()), phases
    # The train phase killed the run after its first checkpoint and the same command resumed from it.
    assert results["train"]["resumed_from"] == "checkpoint-4" and results["train"]["steps"] == 8
    assert "resumed from checkpoint-4 after a kill" in done.stdout
    bench = results["bench"]
    assert set(bench) == {"plain-oasst", "recipe-oasst"}
    for run in bench.values():
        assert run["train_mode"] and run["tokens_per_s"] > 0 and run["compile"] == "off"
        assert run["recompiles"] == 0 and run["graph_breaks"] == 0
    assert bench["recipe-oasst"]["gradient_checkpointing"] and not bench["plain-oasst"]["gradient_checkpointing"]
    assert "Q4_K_M" in {q["type"] for q in results["cpu"]["quants"]}
    table = done.stdout[done.stdout.index("| phase"):]
    for row in ("| gate ", "| base ", "| bench ", "| train ", "| cpu ", "| plain-oasst ", "| recipe-oasst "):
        assert row in table
    # What comes back from a lent machine: at most 8 files in OUT.
    assert len(list((tmp_path / "out").iterdir())) <= 8


def test_a_wrong_pin_stops_the_check_in_seconds_with_one_line(tmp_path):
    real = (REPO / "build" / "requirements.txt").read_text()
    wrong = tmp_path / "build" / "requirements.txt"
    wrong.parent.mkdir()
    wrong.write_text(real.replace("trl==1.16.0", "trl==1.15.0").replace("-r ../requirements.txt", ""))
    t0 = time.monotonic()
    done, results = check(tmp_path, "--requirements", wrong)
    assert done.returncode == 3
    assert time.monotonic() - t0 < 120  # nothing but metadata was read: no model, no phase after the gate
    lines = [line for line in done.stdout.splitlines() if line.startswith("check: ")]
    assert lines == [f"check: version gate: trl 1.16.0 (pinned 1.15.0): carry the build's pins (bash "
                     f"tests/gpu/fetch_wheels.sh) or fix {wrong}"]
    assert list(results["phases"]) == ["gate"] and results["phases"]["gate"]["status"] == "failed"


def test_the_torch_build_is_the_machines_own_and_only_reported(tmp_path):
    """A GPU image brings its own torch (for its CUDA): a different torch pin must not stop the check."""
    real = (REPO / "build" / "requirements.txt").read_text()
    other = tmp_path / "requirements.txt"
    other.write_text(real.replace("torch==2.13.0", "torch==2.11.0").replace("-r ../requirements.txt", ""))
    done, results = check(tmp_path, "--requirements", other, "--phases", "gate")
    assert done.returncode == 0, done.stdout[-2000:]
    assert results["phases"]["gate"]["machine_own"]["torch"].startswith("2.13.0")


@pytest.mark.slow
def test_a_phase_past_its_share_is_cut_and_the_table_still_prints(tmp_path):
    # The bench's runs are made slow (a sitecustomize that sleeps in bench_training.py alone): on a fast CPU the real
    # ones finish well inside the cap, and the cut would not happen.
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import sys, time\nif sys.argv and sys.argv[0].endswith('bench_training.py'):\n    time.sleep(120)\n")
    done, results = check(tmp_path, "--phases", "gate,base,bench", "--cap", "bench=24",
                          env={"PYTHONPATH": str(slow)})
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    phases = results["phases"]
    assert phases["base"]["status"] == "ok"
    assert phases["bench"]["status"] == "cut" and phases["bench"]["seconds"] < 40
    assert "| bench | cut " in done.stdout  # the table, after the cut
    errors = [r["error"] for r in results["bench"].values()]  # plain: its half of the phase; recipe: the rest
    assert errors[0].startswith("cut after its ") and errors[1] == "cut at the phase's end"
    # Every process of the cut phase is gone (its whole process group was killed).
    ps = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_a_budget_spent_skips_the_phases_left_and_says_so(tmp_path):
    # 10 s of budget, 5 kept back for the table: less than the base phase's floor, whatever this machine's speed.
    done, results = check(tmp_path, "--phases", "base", "--budget", "10")
    phases = results["phases"]
    assert phases["base"]["status"] == "skipped" and "no time left" in phases["base"]["detail"]
    assert done.returncode == 1 and "| base  | skipped" in done.stdout


@pytest.mark.slow
def test_a_gate_past_its_share_stops_the_check_with_its_table(tmp_path):
    """On a cold H200 machine the gate's imports ran past its 30 s and the check died in a traceback. A package that
    imports slowly (here a `trl` that sleeps, first on the path) now cuts the gate: table, exit 1, nothing after."""
    slow = tmp_path / "slow" / "trl"
    slow.mkdir(parents=True)
    (slow / "__init__.py").write_text("import time\ntime.sleep(120)\n")
    done, results = check(tmp_path, "--phases", "gate,base", "--cap", "gate=8",
                          env={"PYTHONPATH": str(slow.parent)})
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert results["phases"]["gate"]["status"] == "cut" and "base" not in results["phases"]
    assert "| gate  | cut " in done.stdout


def test_a_failed_command_is_summed_up_by_its_error_not_its_last_progress_bar(tmp_path):
    """The H200 run's train phase said "the run after the kill failed:   0%| | 0/20": tqdm draws after the
    traceback. The summary line is the exception (or the build's `error: ...`)."""
    sys.path.insert(0, str(CHECK.parent))
    try:
        import check as gpu_check
    finally:
        sys.path.remove(str(CHECK.parent))
    log = tmp_path / "train.log"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised:\n"
                   "AssertionError: Node add_370 was invalid, but is output\n\nSet TORCHDYNAMO_VERBOSE=1 for more\n\n"
                   "  0%|          | 0/20 [00:12<?, ?it/s]\n")
    assert gpu_check.last_line(log) == "AssertionError: Node add_370 was invalid, but is output"
    log.write_text("[train] running\nerror: stage 'train' failed\r 10%|#  | 2/20\n")
    assert gpu_check.last_line(log) == "error: stage 'train' failed"
    log.write_text("[cpu] merge done\n")
    assert gpu_check.last_line(log) == "[cpu] merge done"
