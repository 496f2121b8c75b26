"""Stage 2, train: QLoRA SFT with TRL's `SFTTrainer` + PEFT LoRA, resumable from the latest checkpoint.

Outputs in adapter/: the LoRA adapter (adapter_model.safetensors, adapter_config.json), the base tokenizer with its
own chat template, loss_curve.png, log_history.json; checkpoints/ (with TensorBoard runs/) for crash recovery.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import time
from pathlib import Path

from .architectures import get_arch
from .basemodel import copy_tokenizer_files
from .common import BuildError, log, read_json, write_json
from .distributed import Procs, accumulation_steps, from_main, fsdp
from .recipe import Recipe, template_path

CHECKPOINT_FILES = ("trainer_state.json",)  # written last by Trainer._save_checkpoint: its presence = complete
COMPILE_BACKEND = "inductor"  # torch.compile backend of compile_decoder (the tests swap in one that fails)
# Compiled layers can fail after a first step that worked: dynamo recompiles with dynamic shapes when the second
# sequence length arrives (packed rows change length at every step), and those kernels first run then. Any error in
# these first steps of a run (fresh or resumed) falls back to eager; later, the compiled kernels have all run.
COMPILE_TRIAL_STEPS = 10
# Beside the checkpoints: the compile error a run fell back on, so that the run that resumes it stays eager (as the
# run it continues was) instead of failing to compile again.
COMPILE_FAILED = "compile_failed.json"
# Fragments of the errors after which a process's CUDA context is unusable (every later CUDA call fails too), so an
# eager retry in the same process cannot work.
CUDA_POISON = ("CUDA error", "illegal memory access", "device-side assert", "misaligned address")
# transformers' optimizers that run on bitsandbytes (transformers.trainer_optimizer._BITSANDBYTES_OPTIMIZERS, private);
# optim_uses_bitsandbytes also catches later names by their paged_/bnb marks.
BNB_OPTIMIZERS = frozenset(
    {
        "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "ademamix", "ademamix_8bit",
        "paged_ademamix_32bit", "paged_ademamix_8bit", "lion_32bit", "lion_8bit", "paged_lion_32bit",
        "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
    }
)  # fmt: skip
MULTI_PROCESS_OPTIM = "adamw_torch_fused"  # fused: one kernel for all LoRA tensors, on CUDA and on CPU alike


def load_split(data_dir: Path, split: str):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(data_dir / f"{split}.jsonl"), split="train")
    # SFTTrainer tokenizes every column it is given; tree_id/lang are bookkeeping for the split check only.
    return ds.select_columns(["messages"])


def mask_template(recipe: Recipe, tokenizer, check_on: list[list[dict]] = ()) -> str:
    """The chat template with {% generation %} markers that decides which tokens carry loss (and which tokens the
    evaluation scores): the recipe's `training_chat_template`, the tokenizer's own if it has markers, or TRL's twin.

    A recipe template only marks tokens; it must render the same text as the model's own template (checked on
    `check_on`), or the model would be trained on a format the Space never sends.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if recipe.training_chat_template:
        path = template_path(recipe)
        custom = path.read_text(encoding="utf-8")
        if not has_generation_markers(custom):
            raise BuildError(f"training_chat_template {path.name} has no {{% generation %}} markers")
        for messages in check_on:
            for prompt in (False, True):  # the whole conversation, and the prompt the Space sends before a reply
                msgs = messages[:-1] if prompt else messages
                ours = tokenizer.apply_chat_template(
                    msgs, tokenize=False, chat_template=custom, add_generation_prompt=prompt
                )
                theirs = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
                if ours != theirs:
                    at = len(os.path.commonprefix([ours, theirs]))
                    raise BuildError(
                        f"training_chat_template {path.name} renders differently from the model's chat "
                        f"template (from character {at}: {ours[at : at + 30]!r} vs {theirs[at : at + 30]!r})"
                    )
        return custom
    if has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        raise BuildError(
            "assistant-only loss: TRL ships no training twin of this base's chat template; set "
            "training_chat_template to a copy with {% generation %} markers (see build/templates/)"
        ) from None


def lora_targets(recipe: Recipe, model_type: str) -> list[str]:
    return recipe.lora_target_modules or list(get_arch(model_type).lora_targets)


def optim_uses_bitsandbytes(optim: str) -> bool:
    return optim in BNB_OPTIMIZERS or optim.startswith("paged_") or "bnb" in optim


def optimizer_for(recipe: Recipe, procs: Procs) -> str:
    """The recipe's optimizer, except bitsandbytes' under several processes: sharded (FSDP) checkpoints and resume
    with them are untested (PEFT's FSDP guide: paged_adamw_8bit fails to save a checkpoint; bitsandbytes#1708: resume
    on several GPUs). LoRA's optimizer state is small, so 32-bit AdamW costs little memory there."""
    if not (procs.multi and optim_uses_bitsandbytes(recipe.optim)):
        return recipe.optim
    if procs.is_main:
        log(
            f"[train] optim: {MULTI_PROCESS_OPTIM} instead of the recipe's {recipe.optim} under {procs.world_size} "
            "processes: bitsandbytes' paged/8-bit optimizers are untested with sharded checkpoints and resume"
        )
    return MULTI_PROCESS_OPTIM


def build_trainer(recipe: Recipe, base: str, data_dir: Path, checkpoints_dir: Path, procs: Procs = Procs()):
    """An SFTTrainer ready to train (also used by the tests to inspect the loss mask). With several processes each
    one builds its own (DDP or FSDP wrap it), on its own GPU, with the accumulation split between them."""
    import torch
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    targets = lora_targets(recipe, AutoConfig.from_pretrained(base).model_type)
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_ds, eval_ds = load_split(data_dir, "train"), load_split(data_dir, "eval")
    if recipe.assistant_only_loss:
        mask_template(recipe, tokenizer, check_on=train_ds[:3]["messages"])  # fail before loading the model

    cuda = torch.cuda.is_available()
    sharded = fsdp()
    dtype = getattr(torch, recipe.compute_dtype)
    quant = None
    if recipe.load_in_4bit:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=recipe.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards float tensors only: bitsandbytes' FSDP-QLoRA guide stores the packed 4-bit weights in the
            # compute dtype, so that they shard (and flatten with the LoRA weights) like the rest of the model.
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
        )
    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=dtype,
        quantization_config=quant,
        attn_implementation=recipe.attn_implementation,
        # Every 4-bit shard on this process's GPU (DDP: a whole copy per GPU). Under FSDP, accelerate places and
        # shards the model itself (cpu_ram_efficient_loading: rank 0 reads the weights, sync_module_states sends them).
        device_map={"": procs.local_rank} if cuda and not sharded else None,
    )
    if quant is not None and not cuda:
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel the first time it runs in
        # eval mode (the step-0 eval), and training then goes on with that kernel. A run resumed after the last eval
        # would compute with the other one and drift from the uninterrupted run (seen: 0.016 on LoRA weights after
        # 30 steps), and torch.compile rejects the repacked weights. One kernel throughout avoids both.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    peft_config = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=targets,
        bias="none",  # biases stay frozen: the merged model must be exactly base + BA
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(checkpoints_dir),
        max_length=recipe.max_length,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.per_device_eval_batch_size,
        # The global batch stays the single-GPU recipe's: per-device batch x accumulation x processes.
        gradient_accumulation_steps=accumulation_steps(recipe.gradient_accumulation_steps, procs),
        num_train_epochs=recipe.num_train_epochs,
        max_steps=recipe.max_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        optim=optimizer_for(recipe, procs),
        activation_checkpointing=recipe.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        # Non-reentrant: torch's recommended mode; the reentrant one needs grad-requiring inputs, frozen here.
        activation_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
        assistant_only_loss=recipe.assistant_only_loss,
        # Only a recipe template needs passing: TRL swaps in its own twins by itself.
        chat_template_path=str(template_path(recipe))
        if recipe.assistant_only_loss and recipe.training_chat_template
        else None,
        packing=recipe.packing,
        # The eval loss stays one conversation per row either way, comparable between packed and unpacked recipes.
        eval_packing=False,
        logging_steps=recipe.logging_steps,
        eval_strategy="steps",
        eval_steps=recipe.eval_steps,
        eval_on_start=True,  # the step-0 eval loss is the baseline the card compares against
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        # The adapter exported is the checkpoint with the lowest eval loss, not the last one (Trainer keeps it on
        # disk whatever save_total_limit says; recipe.validate makes every checkpoint an evaluated one).
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=recipe.compute_dtype == "bfloat16",
        fp16=recipe.compute_dtype == "float16",
        use_cpu=not cuda,
        report_to=["tensorboard"],
        dataloader_num_workers=0,
        # DDP: every LoRA weight gets a gradient at every step, so skip the search for unused parameters.
        ddp_find_unused_parameters=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    # TRL casts QLoRA adapter weights to bf16, but Trainer's resume reloads them with PEFT's load_adapter, which
    # upcasts to fp32: a resumed run would train in another precision than the run it replaces. Keep fp32 master
    # weights in both (PEFT's default; LoRA weights are <1% of the model, and bf16 autocast still runs the matmuls).
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if recipe.compile_decoder and sharded:
        log("[train] compile_decoder is off under FSDP: compiled layers inside FSDP's wrapping are untested here")
    elif recipe.compile_decoder:
        # Layer by layer and in place: parameter names (checkpoints, the adapter) stay the eager model's, identical
        # layers reuse one compiled graph, and TRL's chunked loss head and the PEFT wrapper stay eager. Gradient
        # checkpointing wraps each compiled layer (transformers' GradientCheckpointingLayer.__call__), so backward
        # recomputes through the compiled graph. In train mode on an H200 (2026-12-04, torch 2.11) that failed to
        # compile (inductor's partitioner): train_with_compile_fallback goes on eager, and the recipe leaves it off.
        for layer in decoder_layers(trainer.model):
            layer.compile(backend=COMPILE_BACKEND)
    return trainer


def uncompile(model) -> None:
    """Back to eager after a failed compile: drop each layer's compiled call and dynamo's caches."""
    import torch

    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
    torch._dynamo.reset()


def poisons_cuda(error: BaseException) -> bool:
    """Whether `error` (or an exception it wraps) leaves this process's CUDA context unusable."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", ())
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, accelerator_error):
            return True
        if isinstance(error, RuntimeError) and any(s in str(error) for s in CUDA_POISON):
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


def describe(error: BaseException) -> str:
    """`ExcType (first line of its message)`; for a dynamo wrapper, what the compiler itself raised."""
    inner = getattr(error, "inner_exception", None)  # BackendCompilerFailed: what the compiler raised
    cause = f"{type(inner).__name__}: {inner}" if inner else (str(error).strip().splitlines() or ["?"])[0]
    return f"{type(error).__name__} ({cause[:300]})"


def train_with_compile_fallback(trainer, recipe: Recipe, resume: Path | None, throughput=None) -> str | None:
    """trainer.train(); if compile_decoder's layers fail in the first COMPILE_TRIAL_STEPS steps of the run (at
    compile time or when their kernels first run), say so and train eager from where it started (step 0, or the
    checkpoint it resumed) rather than lose the run, and leave COMPILE_FAILED beside the checkpoints for a later
    resume. Returns "ExcType (message) at step N", or None. Later failures are raised; an error that leaves CUDA
    unusable becomes a BuildError, as no retry can work in this process."""
    import torch

    may_retry = bool(recipe.compile_decoder)
    first_step = int(resume.name.removeprefix("checkpoint-")) if resume else 0
    # A resumed run gets its weights, optimizer and random state back from its checkpoint; a fresh one from here.
    fresh = may_retry and resume is None
    start = [(p, p.detach().clone()) for p in trainer.model.parameters() if p.requires_grad] if fresh else []
    rng = rng_state() if fresh else None
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return None
    except Exception as e:  # never KeyboardInterrupt: that is a BaseException, and a Ctrl-C must stop the run
        step = trainer.state.global_step + 1  # the step being computed, numbered as log_history numbers them
        if not may_retry or trainer.state.global_step - first_step >= COMPILE_TRIAL_STEPS:
            raise
        if poisons_cuda(e):
            raise BuildError(
                f"the compiled decoder layers hit a CUDA error at step {step} ({describe(e)}), after which this "
                "process's CUDA context cannot be used again, so it cannot go on eager: rerun with "
                "--compile_decoder false"
            ) from e
        error = f"{describe(e)} at step {step}"
    where = f"{resume.name}" if resume else "step 0"
    log(f"[train] compile_decoder: the compiled layers failed: {error}; training again from {where}, eager")
    # Back to the state of the first call, so that the eager run is the one the recipe would have made without
    # compile: the LoRA weights before any step, a new optimizer and schedule (Trainer creates them only when None),
    # the same random draws (dropout, data order), no checkpoint of the failed attempt, no speed marks from it.
    with torch.no_grad():
        for param, before in start:
            param.copy_(before)
        for param in trainer.model.parameters():
            param.grad = None
    trainer.optimizer = None
    trainer.lr_scheduler = None
    checkpoints = Path(trainer.args.output_dir)
    if trainer.is_world_process_zero():
        for old in checkpoints.glob("checkpoint-*"):
            if not old.name.removeprefix("checkpoint-").isdigit() or int(old.name.split("-")[1]) > first_step:
                shutil.rmtree(old, ignore_errors=True)
        write_json(checkpoints / COMPILE_FAILED, {"error": error})
    if throughput is not None:
        throughput.reset()
    uncompile(trainer.model)
    release_memory()  # the failed attempt's optimizer state and cached blocks: eager needs more memory than compiled
    if rng is not None:
        set_rng_state(rng)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return error


def rng_state() -> dict:
    """Every random generator a training step draws from (dropout, data order)."""
    import random

    import numpy as np
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def release_memory() -> None:
    """Once the trainer is dropped: free compiled graphs, the objects only cycles kept alive (the model, optimizer
    state), and the CUDA caching allocator's blocks, so the stages after training start from an empty GPU."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


def decoder_layers(model):
    """The repeated decoder blocks of a (PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise BuildError(f"compile_decoder: no decoder layers found in {type(base).__name__} (expected .model.layers)")
    return layers


def throughput_callback():
    """A TrainerCallback that measures tokens per second after warm-up: over the second half of the logged steps,
    so that torch.compile's first steps, CUDA's warm-up and the first eval do not count. Tokens are those the model
    read (TRL's `num_tokens`: padding excluded). On CUDA it also keeps the most device memory in use at a step's end."""
    import torch
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        def __init__(self):
            self.cuda = torch.cuda.is_available()
            self.peak_device_used: int | None = 0 if self.cuda else None
            self.reset()

        def reset(self):
            """Forget the steps measured so far (a run that starts again from step 0)."""
            self.marks: list[tuple[float, int]] = []  # (seconds, tokens read so far) at each train-loss log
            self.modes: set[bool] = set()  # model.training at each optimizer step: Trainer sets train mode
            self.checkpointing: set[bool] = set()  # gradient checkpointing enabled at each step

        def on_step_end(self, args, state, control, model=None, **kwargs):  # after the step, before any eval
            if model is not None:
                self.modes.add(model.training)
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                self.checkpointing.add(bool(getattr(base, "is_activation_checkpointing", False)))
            if self.cuda:
                # The device's own count, not torch's allocator's: bitsandbytes' paged optimizer keeps its state in
                # CUDA managed memory, which max_memory_reserved never sees but a smaller GPU must still hold. (It
                # counts every process on the device, and the CUDA context: the figure for a GPU of one's own.)
                free, total = torch.cuda.mem_get_info()
                self.peak_device_used = max(self.peak_device_used, total - free)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "num_tokens" in logs:
                self.marks.append((time.perf_counter(), logs["num_tokens"]))

        def steady_rate(self) -> float | None:
            if len(self.marks) < 4:
                return None
            (t0, n0), (t1, n1) = self.marks[len(self.marks) // 2], self.marks[-1]
            return round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else None

    return Throughput()


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """Newest *complete* checkpoint: one killed mid-write lacks trainer_state.json and is skipped."""
    found = []
    for d in checkpoints_dir.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and all((d / f).is_file() for f in CHECKPOINT_FILES):
            found.append((int(step), d))
    return max(found)[1] if found else None


def prepare_checkpoints(checkpoints_dir: Path, fp: str, force: bool) -> Path | None:
    """Keep checkpoints only if they come from the same inputs; returns the one to resume from."""
    stamp = checkpoints_dir / "fingerprint.json"
    if force or (read_json(stamp) or {}).get("fingerprint") != fp:
        if checkpoints_dir.exists():
            shutil.rmtree(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": fp})
    return latest_checkpoint(checkpoints_dir)


def plot_loss(history: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a build machine
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def run(
    recipe: Recipe, base: str, data_dir: Path, adapter_dir: Path, fp: str, force: bool, procs: Procs = Procs()
) -> tuple[dict | None, list[Path]]:
    """Train; with several processes every rank calls this, and only the main one prepares the folders and writes the
    adapter, the plot and the result (the others return (None, []))."""
    checkpoints = adapter_dir / "checkpoints"
    resume = None
    if procs.is_main:
        resume = prepare_checkpoints(checkpoints, fp, force)
        if resume is None:  # a fresh run tries compile_decoder again
            (checkpoints / COMPILE_FAILED).unlink(missing_ok=True)
        for entry in adapter_dir.iterdir():  # a rerun starts from an empty adapter/ (checkpoints aside)
            if entry != checkpoints:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    # Every rank resumes from the checkpoint the main process chose, once it has cleared stale ones.
    resume_name = from_main(procs, resume.name if resume else None)
    resume = checkpoints / resume_name if resume_name else None

    # A run that fell back to eager stays eager when it is resumed: the same recipe would fail to compile again.
    earlier = from_main(procs, (read_json(checkpoints / COMPILE_FAILED) or {}).get("error") if resume else None)
    if earlier and recipe.compile_decoder:
        if procs.is_main:
            log(f"[train] compile_decoder: this run fell back to eager before ({earlier}); it resumes eager")
        recipe = dataclasses.replace(recipe, compile_decoder=False)
    trainer = build_trainer(recipe, base, data_dir, checkpoints, procs)
    throughput = throughput_callback()
    trainer.add_callback(throughput)
    if resume and procs.is_main:
        log(f"[train] resuming from {resume.name}")
    compile_error = train_with_compile_fallback(trainer, recipe, resume, throughput) or earlier
    state = trainer.state
    if state.best_model_checkpoint is None and not any(
        h.get("step") == state.global_step and "eval_loss" in h for h in state.log_history
    ):
        trainer.evaluate()  # no checkpoint to choose from: the card's eval loss is the final model's
    history = state.log_history
    # load_best_model_at_end has put the best checkpoint's adapter back into the model: that is what is saved.
    best = state.best_model_checkpoint
    best_step = int(Path(best).name.removeprefix("checkpoint-")) if best else state.global_step

    if getattr(trainer, "is_fsdp_enabled", False):
        # A full (gathered) state dict, so that the adapter saved is an ordinary PEFT adapter, not shards.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter_dir))  # a collective under FSDP: every rank calls it, the main one writes
    if not procs.is_main:
        trainer.accelerator.free_memory()
        del trainer, state
        release_memory()
        return None, []
    # The trainer's tokenizer may carry the training twin of the template; ship the base's own files, as they are.
    copy_tokenizer_files(base, adapter_dir)
    write_json(adapter_dir / "log_history.json", history)
    png = adapter_dir / "loss_curve.png"
    plot_loss(
        history, png, f"{recipe.name}: QLoRA on {(recipe.card_base_model or recipe.model_name_or_path).split('/')[-1]}"
    )

    train_losses = [h["loss"] for h in history if "loss" in h]
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    if not train_losses:
        raise BuildError("training logged no loss: lower logging_steps or train for more steps")
    trainable, total = trainer.model.get_nb_trainable_parameters()
    import torch

    result = {
        "steps": state.global_step,
        "first_loss": train_losses[0],
        "last_loss": train_losses[-1],
        "eval_loss_start": evals[min(evals)],
        "eval_loss_last": evals[max(evals)],
        # The adapter kept: the checkpoint with the lowest eval loss (the last step's model if nothing was saved).
        "best_step": best_step,
        "eval_loss": state.best_metric if best else evals[max(evals)],
        "resumed_from": resume.name if resume else None,
        "compile_error": compile_error,
        "lora_targets": lora_targets(recipe, trainer.model.config.model_type),
        "trainable_params": trainable,
        "total_params": total,
        "train_runtime_s": round(sum(h.get("train_runtime", 0) for h in history), 1),
        "tokens_per_s": throughput.steady_rate(),
        # What the speed was measured in: train mode (dropout on) and, if the recipe asks, checkpointing recompute.
        "train_mode": throughput.modes == {True},
        "gradient_checkpointing": throughput.checkpointing == {True},
        # What a GPU needs to hold this recipe (tests/benchmarks/bench_training.py reports it).
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        # The allocator's cache included: what nvidia-smi shows of this process, what the next stage starts beside.
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None,
        # The device's own peak at step ends (see Throughput): counts memory outside torch's allocator too.
        "peak_device_used_bytes": throughput.peak_device_used,
        "optim": getattr(trainer.args.optim, "value", trainer.args.optim),  # the recipe's, or its multi-process stand-in
    }
    trainer.accelerator.free_memory()
    del trainer, state
    release_memory()
    files = [adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json", png]
    speed = f", {result['tokens_per_s']:,.0f} tokens/s after warm-up" if result["tokens_per_s"] else ""
    log(
        f"[train] {result['steps']} steps, loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, "
        f"eval loss {result['eval_loss_start']:.3f} -> {result['eval_loss']:.3f} (best, step {best_step}){speed}"
    )
    return result, files
