"""The GPU check's CPU rehearsal: tests/gpu/check.py's plumbing (version gate, deadline, resume, table), proven here
before a lent GPU spends its 15 minutes on it. A tiny Phi-3 stands in for Phi-3.5-mini; nothing is installed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO

CHECK = REPO / "tests" / "gpu" / "check.py"


def check(tmp_path, *args, timeout=900) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(CHECK), "--rehearsal", "--out", str(out), "--work",
                           str(tmp_path / "work"), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
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
    done, results = check(tmp_path, "--phases", "gate,base,bench", "--cap", "bench=24")
    assert done.returncode == 1
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
    done, results = check(tmp_path, "--phases", "gate,base", "--budget", "20")
    phases = results["phases"]
    assert phases["gate"]["status"] == "ok"
    assert phases["base"]["status"] == "skipped" and "no time left" in phases["base"]["detail"]
    assert done.returncode == 1 and "| base  | skipped" in done.stdout
