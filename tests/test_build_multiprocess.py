"""Several processes (`accelerate launch` / torchrun): the same loss curve as one process with the same global batch,
and only the main process writes outputs. On CPU with gloo, two processes, the tiny Phi-3 recipe."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import BUILD, REPO, TINY_RECIPE, check_ok, run_build
from oasstbuild import distributed
from oasstbuild.common import BuildError

# Two micro-batches of 2 rows per optimizer step: one process accumulates both, two processes take one each.
# No LoRA dropout: each rank draws its own dropout masks, so with dropout the curves differ by design.
# 5 steps stay inside the first epoch (22 rows): at an epoch's last, partial step one process accumulates fewer
# micro-batches while accelerate evens the ranks out by repeating rows (seen: step 6 of 8 differed by 0.03).
COMMON = ["--max_steps", "5", "--eval_steps", "2", "--save_steps", "2", "--lora_dropout", "0", "--stages", "data,train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N build/run.py ARGS` (what `accelerate launch` starts; gloo without a GPU)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(BUILD / "run.py"),
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def curve(out):
    history = json.loads((out / "adapter" / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h]


def test_accumulation_is_split_between_processes_or_refused():
    procs = distributed.Procs(rank=0, local_rank=0, world_size=4)
    assert distributed.accumulation_steps(8, procs) == 2
    assert distributed.accumulation_steps(4, distributed.Procs()) == 4
    with pytest.raises(BuildError, match="not divisible by the 4 processes"):
        distributed.accumulation_steps(6, procs)


def test_refused_before_any_stage_when_the_processes_do_not_divide_the_accumulation(tiny_phi3_hf, tmp_path):
    # WORLD_SIZE as torchrun sets it; the check comes before the process group is joined, so one process suffices.
    proc = run_build(
        "--recipe", TINY_RECIPE, "--model_name_or_path", tiny_phi3_hf, "--output-dir", tmp_path / "out",
        "--gradient_accumulation_steps", "3", env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "not divisible by the 2 processes" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tiny_phi3_hf, tmp_path):
    base = ["--recipe", TINY_RECIPE, "--model_name_or_path", tiny_phi3_hf, *COMMON]
    one, two = tmp_path / "one", tmp_path / "two"
    check_ok(run_build(*base, "--gradient_accumulation_steps", "2", "--output-dir", one))
    proc = torchrun(2, *base, "--gradient_accumulation_steps", "2", "--output-dir", two)
    check_ok(proc)

    (loss1, eval1), (loss2, eval2) = curve(one), curve(two)
    assert len(loss1) == len(loss2) == 5
    for a, b in zip(loss1, loss2):
        assert abs(a - b) < 2e-3 * max(1.0, abs(a)), (loss1, loss2)
    assert eval2[-1] < eval2[0]  # it learned
    # and the adapters the two runs kept are the same weights
    from safetensors.torch import load_file

    a1, a2 = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (one, two))
    assert a1.keys() == a2.keys()
    for k in a1:
        assert (a1[k] - a2[k]).abs().max().item() < 1e-3, k
    assert len(eval1) == len(eval2)
    for a, b in zip(eval1, eval2):  # eval rows are split between ranks and averaged per batch: looser
        assert abs(a - b) < 0.05 * abs(a), (eval1, eval2)

    # Only the main process wrote: one marker per stage, one "done" line each, one report.
    log = proc.stdout + proc.stderr
    assert log.count("[data] done") == 1 and log.count("[train] done") == 1, log[-3000:]
    assert sorted(p.name for p in (two / ".stages").iterdir()) == ["data.json", "train.json"]
    report = json.loads((two / "report.json").read_text())
    assert report["train"]["steps"] == 5

    # Killed after the step-2 checkpoint (no train marker, no later checkpoint): every rank resumes from step 2 and
    # the curve ends as the uninterrupted one did.
    import shutil

    (two / ".stages" / "train.json").unlink()
    for later in (two / "adapter" / "checkpoints").glob("checkpoint-*"):  # 4, and 5 (Trainer saves the last step)
        if int(later.name.split("-")[1]) > 2:
            shutil.rmtree(later)
    proc = torchrun(2, *base, "--gradient_accumulation_steps", "2", "--output-dir", two)
    check_ok(proc)
    log = proc.stdout + proc.stderr
    assert log.count("[train] resuming from checkpoint-2") == 1, log[-3000:]
    resumed, _ = curve(two)
    assert len(resumed) == 5
    for a, b in zip(resumed, loss2):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (resumed, loss2)


@pytest.mark.slow
def test_bitsandbytes_optimizers_give_way_to_fused_adamw_under_several_processes(tiny_phi3_hf, tmp_path):
    """The default recipe's paged 8-bit AdamW is untested with sharded checkpoints and resume: under several
    processes the build says so and trains with torch's fused AdamW, and report.json names the optimizer used."""
    out = tmp_path / "out"
    proc = torchrun(
        2, "--recipe", TINY_RECIPE, "--model_name_or_path", tiny_phi3_hf, "--optim", "paged_adamw_8bit",
        "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--gradient_accumulation_steps", "2",
        "--stages", "data,train", "--output-dir", out,
    )  # fmt: skip
    check_ok(proc)
    line = "[train] optim: adamw_torch_fused instead of the recipe's paged_adamw_8bit under 2 processes"
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]  # said once, by the main process
    report = json.loads((out / "report.json").read_text())["train"]
    assert report["optim"] == "adamw_torch_fused" and report["steps"] == 2
