"""The train stage's speed options, checked for what they must not change: padding-free packing (the model sees
each conversation exactly as if it were alone in its row, with the same loss mask) and compile_decoder (the same
losses as the eager model). Their speed is measured by tests/benchmarks/bench_training.py on a GPU."""

from __future__ import annotations

import pytest
from conftest import TINY_RECIPE
from oasstbuild import train
from oasstbuild.recipe import load_recipe


@pytest.fixture(scope="module")
def tiny_data(tiny_phi3_hf, tmp_path_factory):
    import run

    out = tmp_path_factory.mktemp("speed") / "out"
    args = ["--recipe", str(TINY_RECIPE), "--model_name_or_path", str(tiny_phi3_hf), "--stages", "data"]
    assert run.main([*args, "--output-dir", str(out)]) == 0
    return out / "data"


def trainer_for(tiny_phi3_hf, data, ckpt, **overrides):
    recipe = load_recipe(str(TINY_RECIPE), {"model_name_or_path": str(tiny_phi3_hf), **overrides})
    return train.build_trainer(recipe, str(tiny_phi3_hf), data, ckpt)


def segments(batch):
    """(input_ids, labels, start) of each conversation in a padding-free batch (one row, positions restart at 0)."""
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    return [(ids[a:b], labels[a:b], a) for a, b in zip(starts, starts[1:])]


def test_packed_rows_hold_whole_conversations_scored_as_if_alone(tiny_phi3_hf, tiny_data, tmp_path):
    import torch

    # Rows of 1024 tokens: the tiny tokenizer's threads average ~260 tokens, so most fit whole, several per row.
    plain = trainer_for(tiny_phi3_hf, tiny_data, tmp_path / "plain", max_length=1024)
    packed = trainer_for(tiny_phi3_hf, tiny_data, tmp_path / "packed", max_length=1024, packing=True)
    # What unpacked training sees of each conversation: its tokens and which of them carry loss.
    alone = {tuple(ex["input_ids"]): ex for ex in plain.train_dataset}
    assert len(packed.train_dataset) < len(alone)  # shorter threads share rows

    model = packed.model.eval()
    seen, tokens_in_rows = 0, 0
    for batch in packed.get_train_dataloader():
        assert "attention_mask" not in batch  # padding-free: boundaries come from position_ids alone
        tokens_in_rows += batch["input_ids"].numel()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
            leaky = model(input_ids=batch["input_ids"]).logits[0]  # the same row read as one long text
        for ids, labels, start in segments(batch):
            ex = alone[tuple(ids.tolist())]  # a whole conversation, none cut at a row's end
            assert labels.tolist() == ex["labels"]  # the same assistant-only loss mask
            with torch.no_grad():
                own = model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None]).logits[0]
            in_row = logits[start : start + len(ids)]
            # 4-bit matmuls round differently at another sequence length (~1e-3); attending across conversations
            # would change the logits by tenths, as the same row read without its positions does.
            assert (in_row - own).abs().max() < 1e-2
            if start > 0:
                assert (leaky[start : start + len(ids)] - own).abs().max() > 0.1
            seen += 1
    assert seen == len(alone)  # every conversation, once
    # No padding: the rows carry exactly the conversations' tokens.
    assert tokens_in_rows == sum(len(k) for k in alone)


def test_compiled_decoder_layers_train_like_the_eager_model(tiny_phi3_hf, tiny_data, tmp_path):
    """QLoRA: the layers compile around bitsandbytes' NF4 ops (here on CPU; bench_training.py times it on CUDA)."""
    import torch

    losses = {}
    for compiled in (False, True):
        trainer = trainer_for(tiny_phi3_hf, tiny_data, tmp_path / f"c{compiled}", max_steps=3, eval_steps=100,
                              save_steps=100, lora_dropout=0.0, load_in_4bit=True, compile_decoder=compiled)
        if compiled:
            layers = train.decoder_layers(trainer.model)
            assert all(layer._compiled_call_impl is not None for layer in layers)
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        names = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
        assert not any("_orig_mod" in n for n in names)  # the adapter saves under the eager names
    torch._dynamo.reset()
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)



def test_default_recipes_combination_compiled_checkpointed_packed_trains_like_eager(tiny_phi3_hf, tiny_data, tmp_path):
    """The default recipe turns on gradient checkpointing, compile_decoder and packing together: backward then
    recomputes each compiled layer. The same losses as eager, and no graph break (a break would silently split each
    layer into several graphs and run the rest eager)."""
    import torch
    from torch._dynamo.utils import counters

    combo = dict(gradient_checkpointing=True, packing=True, max_length=256, max_steps=3, eval_steps=100,
                 save_steps=100, lora_dropout=0.0, load_in_4bit=True)
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        trainer = trainer_for(tiny_phi3_hf, tiny_data, tmp_path / f"c{compiled}", compile_decoder=compiled, **combo)
        assert trainer.args.gradient_checkpointing and trainer.args.packing
        modes = []  # model.training at each call of the first layer's MLP (hooks in eager layers only)
        if not compiled:
            # transformers 5 checkpoints inside each decoder layer's forward: its submodules run again in backward.
            mlp = train.decoder_layers(trainer.model)[0].mlp
            mlp.register_forward_pre_hook(lambda m, a: modes.append(m.training))
        trainer.train()
        if not compiled:
            # Trainer puts the model in train mode (dropout, checkpointing): each of the 3 micro-batches runs the
            # MLP twice, forward and the recompute in backward; the step-0 eval runs it once, in eval mode.
            assert modes.count(True) == 2 * 3 and modes.count(False) > 0
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if compiled:
            assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
            assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    torch._dynamo.reset()
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)


def test_a_compile_failure_at_the_first_step_continues_eager(tiny_phi3_hf, tiny_data, tmp_path, monkeypatch, capsys):
    """An Inductor failure (no compiler, an unsupported op) must not lose the run: logged, then eager training."""
    import json

    import run
    import torch

    def broken_backend(gm, example_inputs):
        raise RuntimeError("forced compiler failure")

    monkeypatch.setattr(train, "COMPILE_BACKEND", broken_backend)
    out = tiny_data.parent.parent / "fallback"
    args = ["--recipe", str(TINY_RECIPE), "--model_name_or_path", str(tiny_phi3_hf), "--stages", "data,train",
            "--compile_decoder", "true", "--max_steps", "2", "--output-dir", str(out)]
    try:
        rc = run.main(args)
    finally:
        torch._dynamo.reset()
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "compile_decoder: the compiled layers failed" in err and "training again from step 0, eager" in err
    report = json.loads((out / "report.json").read_text())["train"]
    assert report["steps"] == 2 and "forced compiler failure" in report["compile_error"]
    # The step-0 eval runs the compiled layers first: the failure comes before step 1 is done.
    assert report["compile_error"].endswith("at step 1")


def failing_after_two_steps(tiny_phi3_hf, error: Exception):
    """A torch.compile backend whose compiled layers run (as the eager graph) through two optimizer steps, then raise
    `error` in the third, as a kernel recompiled for a new shape may. Counts training forwards: one per layer per
    micro-batch (the tiny recipe: one micro-batch per step, no checkpointing recompute); evals run without grad."""
    import json

    import torch

    layers = json.loads((tiny_phi3_hf / "config.json").read_text())["num_hidden_layers"]
    calls = []

    def backend(gm, example_inputs):
        def run(*args):
            if torch.is_grad_enabled():
                calls.append(1)
                if len(calls) == 2 * layers + 1:
                    raise error
            return gm.forward(*args)

        return run

    return backend, calls


def train_tiny(tiny_phi3_hf, out, *extra):
    import run
    import torch

    # Checkpoints at step 2: the failed attempt leaves one behind that the eager run must not inherit.
    args = ["--recipe", str(TINY_RECIPE), "--model_name_or_path", str(tiny_phi3_hf), "--stages", "data,train",
            "--max_steps", "5", "--eval_steps", "2", "--save_steps", "2", "--output-dir", str(out), *extra]
    try:
        return run.main(args)
    finally:
        torch._dynamo.reset()


def test_a_runtime_failure_of_compiled_layers_in_the_first_steps_restarts_eager_from_step_0(
    tiny_phi3_hf, tiny_data, monkeypatch, capsys
):
    """Compiled kernels can fail only when they first run, steps in (dynamic-shape recompiles): the run goes on eager
    from step 0, from the same LoRA weights and random state, and ends as an eager run would have (dropout on)."""
    import json

    import torch
    from safetensors.torch import load_file

    backend, calls = failing_after_two_steps(tiny_phi3_hf, RuntimeError("forced kernel failure"))
    monkeypatch.setattr(train, "COMPILE_BACKEND", backend)
    root = tiny_data.parent.parent
    assert train_tiny(tiny_phi3_hf, root / "late-failure", "--compile_decoder", "true") == 0
    err = capsys.readouterr().err
    assert "the compiled layers failed: RuntimeError (forced kernel failure) at step 3" in err, err[-3000:]
    assert "training again from step 0, eager" in err
    n_calls = len(calls)
    assert train_tiny(tiny_phi3_hf, root / "eager", "--compile_decoder", "false") == 0
    assert len(calls) == n_calls  # (the eager run never touched the compiled layers)

    retried, eager = (json.loads((root / d / "report.json").read_text())["train"] for d in ("late-failure", "eager"))
    assert retried["compile_error"] == "RuntimeError (forced kernel failure) at step 3"
    assert eager["compile_error"] is None
    assert eager["optim"] == retried["optim"] == "adamw_torch"  # one process: the recipe's optimizer
    if not torch.cuda.is_available():  # the GPU figures are None here, not 0
        assert retried["peak_gpu_reserved_bytes"] is None and retried["peak_device_used_bytes"] is None
    history = json.loads((root / "late-failure" / "adapter" / "log_history.json").read_text())
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == [1, 2, 3, 4, 5]  # counted from 0 again, none twice
    eager_history = json.loads((root / "eager" / "adapter" / "log_history.json").read_text())
    assert [h["loss"] for h in history if "loss" in h] == [h["loss"] for h in eager_history if "loss" in h]
    assert retried["best_step"] == eager["best_step"] and retried["eval_loss"] == eager["eval_loss"]
    a, b = (load_file(root / d / "adapter" / "adapter_model.safetensors") for d in ("late-failure", "eager"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def killed_after_checkpoint_2(out):
    """What a SIGKILL after checkpoint-2 leaves of a finished 5-step run: the later checkpoints and the stage record
    gone (tests/test_build_resume.py kills a real process; here the run stays in-process for its compile backend)."""
    import shutil

    for later in (out / "adapter" / "checkpoints").glob("checkpoint-*"):
        if int(later.name.split("-")[1]) > 2:
            shutil.rmtree(later)
    (out / ".stages" / "train.json").unlink()


def test_a_run_resumed_after_its_compile_fallback_stays_eager(tiny_phi3_hf, tiny_data, monkeypatch, capsys):
    """Seen on an H200: the compiled layers failed, the run went on eager, was killed, and the rerun compiled again
    and crashed. The fallback is remembered beside the checkpoints; the resumed run is eager, as the run it continues
    was, and ends where the uninterrupted run ended."""
    import json

    import torch
    from safetensors.torch import load_file

    backend, _ = failing_after_two_steps(tiny_phi3_hf, RuntimeError("forced kernel failure"))
    monkeypatch.setattr(train, "COMPILE_BACKEND", backend)
    out = tiny_data.parent.parent / "fallback-resumed"
    assert train_tiny(tiny_phi3_hf, out, "--compile_decoder", "true") == 0
    error = "RuntimeError (forced kernel failure) at step 3"
    assert json.loads((out / "adapter" / "checkpoints" / train.COMPILE_FAILED).read_text()) == {"error": error}
    uninterrupted = load_file(out / "adapter" / "adapter_model.safetensors")
    killed_after_checkpoint_2(out)
    capsys.readouterr()

    compiled = []
    monkeypatch.setattr(train, "COMPILE_BACKEND", lambda gm, example_inputs: compiled.append(1) or gm.forward)
    assert train_tiny(tiny_phi3_hf, out, "--compile_decoder", "true") == 0
    err = capsys.readouterr().err
    assert f"this run fell back to eager before ({error}); it resumes eager" in err, err[-3000:]
    assert "resuming from checkpoint-2" in err and "compiled layers failed" not in err
    assert compiled == []  # never compiled
    report = json.loads((out / "report.json").read_text())["train"]
    assert report["resumed_from"] == "checkpoint-2" and report["compile_error"] == error
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] - uninterrupted[k]).abs().max().item() < 1e-5 for k in resumed)
    # A fresh run (--force) tries compiling again.
    capsys.readouterr()
    assert train_tiny(tiny_phi3_hf, out, "--compile_decoder", "true", "--force") == 0
    assert compiled and "fell back to eager before" not in capsys.readouterr().err
    assert not (out / "adapter" / "checkpoints" / train.COMPILE_FAILED).exists()
    torch._dynamo.reset()


def test_a_resumed_run_whose_compile_fails_goes_on_eager_from_its_checkpoint(
    tiny_phi3_hf, tiny_data, monkeypatch, capsys
):
    """A run that compiled, killed, resumed where compiling fails (another machine, another torch): the resumed run
    goes on eager from the checkpoint it resumed, not from step 0, and not with the failed attempt's checkpoints."""
    import json

    from safetensors.torch import load_file

    monkeypatch.setattr(train, "COMPILE_BACKEND", lambda gm, example_inputs: gm.forward)  # compiles, runs as eager
    out = tiny_data.parent.parent / "resumed-compile-failure"
    assert train_tiny(tiny_phi3_hf, out, "--compile_decoder", "true") == 0
    uninterrupted = load_file(out / "adapter" / "adapter_model.safetensors")
    killed_after_checkpoint_2(out)
    capsys.readouterr()

    def broken_backend(gm, example_inputs):
        raise RuntimeError("forced compiler failure")

    monkeypatch.setattr(train, "COMPILE_BACKEND", broken_backend)
    assert train_tiny(tiny_phi3_hf, out, "--compile_decoder", "true") == 0
    err = capsys.readouterr().err
    assert "the compiled layers failed: BackendCompilerFailed" in err and "forced compiler failure" in err, err[-3000:]
    assert "training again from checkpoint-2, eager" in err
    report = json.loads((out / "report.json").read_text())["train"]
    assert report["resumed_from"] == "checkpoint-2" and report["steps"] == 5
    assert "forced compiler failure" in report["compile_error"]
    history = json.loads((out / "adapter" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5]
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all((resumed[k] - uninterrupted[k]).abs().max().item() < 1e-5 for k in resumed)


def test_a_cuda_error_of_compiled_layers_is_one_sentence_and_no_retry(tiny_phi3_hf, tiny_data, monkeypatch, capsys):
    """After a CUDA error (here its message, raised on the CPU) the process's CUDA context is dead: an eager retry in
    it would fail at once, so the build stops and says how to rerun."""
    backend, _ = failing_after_two_steps(tiny_phi3_hf, RuntimeError("CUDA error: misaligned address"))
    monkeypatch.setattr(train, "COMPILE_BACKEND", backend)
    out = tiny_data.parent.parent / "cuda-failure"
    assert train_tiny(tiny_phi3_hf, out, "--compile_decoder", "true") == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1].split("\x1b[A")[-1]  # the last thing printed, after a progress bar's end
    assert line.startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert "the compiled decoder layers hit a CUDA error at step 3" in line and "misaligned address" in line
    assert "CUDA context cannot be used again" in line and "rerun with --compile_decoder false" in line
    assert "training again" not in err
    # Stopped where it failed: the compiled attempt's step-2 checkpoint is left as it was, and nothing came after it.
    assert sorted(p.name for p in (out / "adapter" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / ".stages" / "train.json").exists()


def test_training_releases_the_trainer_compiled_graphs_and_cuda_cache(tiny_phi3_hf, tiny_data, monkeypatch):
    """After the train stage nothing of training may hold memory the merge needs: the trainer (model, optimizer
    state) is gone, compiled graphs are dropped and the CUDA cache is emptied (a no-op here, but called)."""
    import gc
    import weakref

    import torch
    from oasstbuild.common import OutputDir

    calls, trainers = [], []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (calls.append("dynamo.reset"), reset()))
    build = train.build_trainer

    def tracked(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainers.append(weakref.ref(trainer))
        return trainer

    monkeypatch.setattr(train, "build_trainer", tracked)
    out = OutputDir(tiny_data.parent.parent / "release")
    out.adapter.mkdir(parents=True)
    recipe = load_recipe(str(TINY_RECIPE), {"model_name_or_path": str(tiny_phi3_hf), "max_steps": 2})
    result, _ = train.run(recipe, str(tiny_phi3_hf), tiny_data, out.adapter, "fp", force=True)
    assert result["steps"] == 2
    assert calls[-2:] == ["dynamo.reset", "empty_cache"]
    assert len(trainers) == 1 and trainers[0]() is None, "the trainer outlived the train stage"
    gc.collect()
