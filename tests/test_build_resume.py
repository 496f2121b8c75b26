"""A build killed during training resumes from its last complete checkpoint and ends with the same artefacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import BUILD, REPO, TINY_RECIPE, check_ok, run_build

LONGER = ["--max_steps", "40", "--save_steps", "10", "--eval_steps", "10"]  # room to be killed mid-run


def adapter_tensors(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_killed_after_a_checkpoint_resumes_and_matches_an_uninterrupted_run(tiny_phi3_hf, tmp_path):
    args = ["--recipe", TINY_RECIPE, "--model_name_or_path", tiny_phi3_hf, "--stages", "data,train", *LONGER]
    # Uninterrupted reference.
    ref = tmp_path / "ref"
    check_ok(run_build(*args, "--output-dir", ref))

    # Killed (SIGKILL: no cleanup, like an OOM kill or a lost machine) as soon as a checkpoint is complete.
    out = tmp_path / "out"
    log = open(tmp_path / "killed.log", "w")
    cmd = [sys.executable, str(BUILD / "run.py"), *map(str, args), "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    ckpt = out / "adapter" / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 600
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert not (out / ".stages" / "train.json").exists()
    assert not (out / "adapter" / "adapter_model.safetensors").exists()

    # Same command again: resumes.
    proc = run_build(*args, "--output-dir", out)
    check_ok(proc)
    resumed = json.loads((out / "report.json").read_text())["train"]["resumed_from"]
    assert resumed and resumed.startswith("checkpoint-") and int(resumed.split("-")[1]) in (10, 20, 30)
    assert f"resuming from {resumed}" in proc.stderr

    a, b = adapter_tensors(out), adapter_tensors(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k
    ra, rb = (json.loads((d / "report.json").read_text())["train"] for d in (out, ref))
    assert ra["steps"] == rb["steps"] == 40
    assert abs(ra["eval_loss"] - rb["eval_loss"]) < 1e-4
    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted(p.name for p in (ref / "adapter").iterdir())


@pytest.mark.slow
def test_a_half_written_checkpoint_is_skipped(tmp_path):
    from oasstbuild import train

    ckpts = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, False)):
        d = ckpts / f"checkpoint-{step}"
        d.mkdir(parents=True)
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert train.latest_checkpoint(ckpts).name == "checkpoint-10"
    # and checkpoints made from other inputs are not resumed from
    assert train.prepare_checkpoints(ckpts, "fp-a", force=False) is None
    (ckpts / "checkpoint-10").mkdir(parents=True)
    (ckpts / "checkpoint-10" / "trainer_state.json").write_text("{}")
    assert train.prepare_checkpoints(ckpts, "fp-a", force=False).name == "checkpoint-10"
    assert train.prepare_checkpoints(ckpts, "fp-a", force=True) is None
