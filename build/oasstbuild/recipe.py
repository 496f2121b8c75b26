"""Recipe = every knob of the build, as dataclasses with help texts (like TRL's `SFTConfig` / `ModelConfig`).

A recipe is a flat YAML file under `build/recipes/`; any field can be overridden on the command line
(`--learning_rate 1e-4`, `--quant_types Q4_K_M Q8_0`, `--load_in_4bit false`). Unknown keys are errors.

Each field says which stage it feeds (`stage` metadata): a stage's fingerprint is built from its own fields plus the
stages before it, so changing `quant_types` re-quantizes without retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .common import BuildError

BUILD_DIR = Path(__file__).resolve().parents[1]  # build/: recipes/ and templates/ sit there, beside run.py
RECIPES_DIR = BUILD_DIR / "recipes"
DEFAULT_RECIPE = "phi35-oasst1"
STAGES = ("data", "train", "merge", "export", "quantize", "evaluate", "publish")

# llama.cpp ftype for each quant type offered (numbers from llama.h `enum llama_ftype`; checked against the installed
# llama_cpp by a test). Types that need an importance matrix (IQ1/IQ2/IQ3) are left out: this build computes none.
QUANT_FTYPES = {
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
}
DTYPES = ("float32", "bfloat16", "float16")


def _f(default, help: str, stage: str, **kw):
    kind = "default_factory" if isinstance(default, list) else "default"
    value = (lambda d=default: list(d)) if kind == "default_factory" else default
    return field(**{kind: value}, metadata={"help": help, "stage": stage, **kw})


@dataclass
class ModelArguments:
    model_name_or_path: str = _f(
        "microsoft/Phi-3.5-mini-instruct",
        "Base model: a Hub id, a local HF folder, or `py:PACKAGE/FILE.gguf` = a GGUF file shipped inside an installed "
        "Python package (found without importing it), dequantised once into an HF folder in <output_dir>/base/.",
        "data",
    )
    random_init: bool = _f(
        False,
        "Build the base from its config with random weights (seeded), no weight download. For throughput benchmarks "
        "of a full-size shape; the result is not a useful chat model.",
        "data",
    )
    config_name_or_path: str = _f(
        "", "With random_init: the config (and tokenizer) to build from. Empty = model_name_or_path.", "data"
    )
    load_in_4bit: bool = _f(True, "QLoRA: load the base in 4-bit with bitsandbytes for training.", "train")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit type: nf4 (QLoRA paper) or fp4.", "train")
    bnb_4bit_use_double_quant: bool = _f(True, "Quantize the quantization constants too (QLoRA paper).", "train")
    compute_dtype: str = _f("bfloat16", f"Training compute dtype: one of {', '.join(DTYPES)}.", "train")
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa, eager, flash_attention_2...", "train")
    require_cuda: bool = _f(
        True,
        "Refuse to train without a usable CUDA device (checked before anything is downloaded). A recipe sized for a "
        "GPU would otherwise train on the CPU for days: bitsandbytes' paged optimizer only warns.",
        "train",
        fingerprint=False,
    )


@dataclass
class DataArguments:
    dataset: str = _f(
        "OpenAssistant/oasst1",
        "oasst1-schema messages: a Hub dataset id or a local dataset folder (train split -> train, validation split "
        "-> eval), or a .jsonl/.parquet file (eval = a by-tree `eval_fraction`). Relative paths: from the repo root.",
        "data",
    )
    languages: list[str] = _f(
        [], "Keep trees whose first message is in these languages (oasst `lang`); [] = all.", "data"
    )
    eval_fraction: float = _f(0.05, "Local files only: fraction of trees held out for eval (whole trees).", "data")
    max_train_threads: int = _f(
        0, "Use at most this many training threads (first ones in file order); 0 = all.", "data"
    )
    max_eval_threads: int = _f(0, "Use at most this many eval threads; 0 = all.", "data")


@dataclass
class LoraArguments:
    lora_r: int = _f(16, "LoRA rank.", "train")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).", "train")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.", "train")
    lora_target_modules: list[str] = _f(
        [], "Modules to adapt; [] = the architecture's full set of linear layers (see architectures.py).", "train"
    )


@dataclass
class TrainArguments:
    max_length: int = _f(2048, "Max tokens per conversation (longer ones are truncated at the end).", "train")
    per_device_train_batch_size: int = _f(4, "Micro-batch size.", "train")
    per_device_eval_batch_size: int = _f(4, "Eval micro-batch size.", "train")
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step.", "train")
    num_train_epochs: float = _f(1.0, "Epochs over the training threads (ignored when max_steps > 0).", "train")
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 = use num_train_epochs.", "train")
    learning_rate: float = _f(2e-4, "Peak learning rate.", "train")
    lr_scheduler_type: str = _f("cosine", "LR schedule (transformers SchedulerType).", "train")
    warmup_steps: float = _f(0.03, "Warmup: steps if >= 1, else a fraction of all steps.", "train")
    weight_decay: float = _f(0.0, "AdamW weight decay.", "train")
    max_grad_norm: float = _f(0.3, "Gradient clipping.", "train")
    optim: str = _f("paged_adamw_8bit", "Optimizer (transformers OptimizerNames).", "train")
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward: memory for ~30% time.", "train")
    packing: bool = _f(
        False,
        "Padding-free packing: conversations laid end to end in rows of max_length (TRL best-fit decreasing), "
        "positions restarting at each one so that attention stays within it. No compute is spent on padding.",
        "train",
    )
    compile_decoder: bool = _f(
        False,
        "torch.compile each decoder layer (the first steps take a minute or two longer while it compiles).",
        "train",
    )
    assistant_only_loss: bool = _f(True, "Train on assistant tokens only (TRL `assistant_only_loss`).", "train")
    training_chat_template: str = _f(
        "",
        "Jinja template with {% generation %} markers used only to build the loss mask, for bases whose template TRL "
        "does not ship a training twin of. Must render exactly like the model's own template (checked). Relative "
        "paths are taken from build/. Empty = TRL's built-in twin.",
        "train",
    )
    logging_steps: int = _f(10, "Log the train loss every N steps.", "train")
    eval_steps: int = _f(100, "Eval loss every N steps.", "train")
    save_steps: int = _f(
        100,
        "Checkpoint every N steps, a multiple of eval_steps: the checkpoint with the best eval loss is the one kept "
        "and exported; a crashed run resumes from the latest.",
        "train",
    )
    save_total_limit: int = _f(2, "Checkpoints kept on disk.", "train")
    seed: int = _f(42, "Seed for data order, LoRA init, dropout and random_init weights.", "data")


@dataclass
class MergeArguments:
    merge_dtype: str = _f(
        "float16",
        "dtype the merged model is saved in, for the converter. The merge itself is computed in float32 from the "
        "unquantized base (never the 4-bit one). float16 = the GGUF's own type: one rounding, not two.",
        "merge",
    )
    merge_check_samples: int = _f(4, "Eval conversations used to compare merged vs adapter logits.", "merge")
    merge_check_atol: float = _f(
        0.0, "Max |merged - adapter| logit difference allowed; 0 = merge.py's DEFAULT_ATOL (1e-2).", "merge"
    )


@dataclass
class ExportArguments:
    llama_cpp_dir: str = _f(
        "",
        "A llama.cpp checkout with convert_hf_to_gguf.py. Empty = the llama-cpp-python sdist of the installed "
        "version, fetched once with pip into the cache dir.",
        "export",
    )
    gguf_name: str = _f(
        "Phi-3.5-mini-instruct-oasst1",
        "GGUF file stem and `general.name`. Phi-3 needs 'Phi-3' in it: llama.cpp picks tokenizer rules from it.",
        "export",
    )
    quant_types: list[str] = _f(["Q4_K_M", "Q5_K_M"], f"Quant types: {', '.join(QUANT_FTYPES)}.", "quantize")


@dataclass
class EvalArguments:
    eval_conversations: int = _f(
        64, "Held-out conversations scored for perplexity (assistant tokens only).", "evaluate"
    )
    eval_ctx: int = _f(2048, "llama.cpp context for evaluation; longer conversations are cut.", "evaluate")
    eval_base: bool = _f(
        True,
        "Also score the base model, its GGUF made by the same export and quantize code (f16 and the first of "
        "quant_types), on the same held-out conversations: the report says how much the fine-tune changed "
        "perplexity.",
        "evaluate",
    )
    n_threads: int = _f(
        0,
        "llama.cpp threads for generation (the tokens/s measurement); 0 = every CPU this process may use.",
        "evaluate",
    )
    n_threads_batch: int = _f(
        0, "llama.cpp threads for prompt processing (perplexity); 0 = every CPU this process may use.", "evaluate"
    )
    sample_prompt: str = _f(
        "What is the capital of France? Answer in one sentence.", "Prompt for the sample answer.", "evaluate"
    )
    sample_max_tokens: int = _f(128, "Max tokens of the sample answer (also the tokens/s measurement).", "evaluate")
    compare_prompts: int = _f(
        3,
        "Held-out first prompts answered by the base and the fine-tune (first of quant_types, same sampling and "
        "seed), side by side in report.json and the card; 0 = none. Needs eval_base.",
        "evaluate",
    )
    compare_max_tokens: int = _f(160, "Max tokens of each side-by-side (and judged) answer.", "evaluate")
    compare_temperature: float = _f(0.7, "Sampling temperature of the side-by-side (and judged) answers.", "evaluate")
    compare_seed: int = _f(
        1234, "Sampling seed of the side-by-side (and judged) answers, the same for both models.", "evaluate"
    )
    judge_model: str = _f(
        "",
        "Optional judged comparison (for a GPU box; off when empty): a local HF chat model (folder or cached Hub id) "
        "that picks the better of the base's and the fine-tune's answers to judge_prompts held-out prompts, in both "
        "orders; the report gives win/tie/loss with a bootstrap interval.",
        "evaluate",
    )
    judge_prompts: int = _f(64, "Held-out first prompts for the judged comparison.", "evaluate")
    visitor_votes: str = _f(
        "",
        "The Space's side-by-side votes (its votes.csv: a path, or the Hub dataset of its FEEDBACK_REPO): the card "
        "says how often visitors preferred the fine-tune over its base, with a 95% interval. Votes change without "
        "this field changing: re-run with --stages publish --force to count new ones.",
        "publish",
    )


@dataclass
class HubArguments:
    hub_repo: str = _f(
        "", "Model repo to publish hub/ to (e.g. you/phi35-oasst1-gguf); empty = build hub/ only.", "publish"
    )
    hub_private: bool = _f(False, "Create the repo private.", "publish")
    hub_include_f16: bool = _f(False, "Also publish the f16 GGUF (7.6 GB for Phi-3.5-mini).", "publish")
    hub_include_base: bool = _f(
        False,
        "Also publish the base model's GGUF that evaluate made (first of quant_types) under base/: the Space's "
        "side-by-side mode can then pair the fine-tune with its base from one repo (ARENA_MODELS).",
        "publish",
    )
    card_base_model: str = _f("", "`base_model` in the card; empty = model_name_or_path.", "publish")
    card_license: str = _f("mit", "`license` in the card (the base model's).", "publish")
    card_dataset: str = _f("", "`datasets` in the card; empty = dataset when it is a Hub id.", "publish")


GROUPS = (
    ModelArguments,
    DataArguments,
    LoraArguments,
    TrainArguments,
    MergeArguments,
    ExportArguments,
    EvalArguments,
    HubArguments,
)


@dataclass
class Recipe(
    HubArguments,
    EvalArguments,
    ExportArguments,
    MergeArguments,
    TrainArguments,
    LoraArguments,
    DataArguments,
    ModelArguments,
):
    """All fields of all groups, flat (as in the YAML). `name` is the recipe's file stem."""

    name: str = field(default="", metadata={"help": "Recipe name (file stem).", "stage": "", "internal": True})

    def fields_for(self, stage: str) -> dict:
        """The fields that feed `stage`'s outputs (its fingerprint); checks such as require_cuda do not."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("stage") == stage and f.metadata.get("fingerprint", True)
        }

    @property
    def is_local_dataset(self) -> bool:
        """A single file; a Hub id or a local `datasets` folder (train/validation splits) is not."""
        return self.dataset.endswith((".jsonl", ".json", ".parquet"))


def recipe_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")}


# ---------------------------------------------------------------------------------------------------------------------
# Values: YAML and command line go through the same coercion, so both give the same one-line errors
# ---------------------------------------------------------------------------------------------------------------------

_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _coerce(name: str, value):
    tp = typing.get_type_hints(Recipe)[name]
    try:
        if tp == list[str]:
            if value is None:
                return []
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise ValueError
            # `--quant_types Q4_K_M Q8_0` and `--quant_types Q4_K_M,Q8_0` mean the same
            return [v for item in value for v in str(item).replace(",", " ").split()]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE | _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    raise BuildError(f"recipe field '{name}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _unknown(key: str, where: str) -> BuildError:
    close = difflib.get_close_matches(key, recipe_fields(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return BuildError(f"unknown key '{key}' in {where}{hint}")


def resolve_recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise BuildError(f"recipe file not found: {p}")
        return p
    p = RECIPES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
        raise BuildError(f"no recipe named '{name_or_path}' (known: {known}; or give a path to a .yaml file)")
    return p


def load_recipe(name_or_path: str, overrides: dict | None = None) -> Recipe:
    """YAML recipe + overrides -> validated Recipe. Raises BuildError with one line naming the problem."""
    import yaml

    path = resolve_recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise BuildError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise BuildError(f"recipe {path} must be a mapping of field: value")
    fields = recipe_fields()
    values = {}
    for source, items in ((f"recipe {path}", raw), ("command line", overrides or {})):
        for key, value in items.items():
            if key not in fields:
                raise _unknown(key, source)
            values[key] = _coerce(key, value)
    recipe = Recipe(**values, name=path.stem)
    validate(recipe)
    return recipe


def repo_root() -> Path:
    return BUILD_DIR.parent


def dataset_path(recipe: Recipe) -> Path:
    p = Path(recipe.dataset).expanduser()
    return p if p.is_absolute() or p.exists() else repo_root() / p


def validate(r: Recipe) -> None:
    """Checks that need no heavy import and no network: everything that would otherwise fail hours into a run."""
    bad = [q for q in r.quant_types if q.upper() not in QUANT_FTYPES]
    if bad:
        raise BuildError(f"unknown quant type '{bad[0]}' (valid: {', '.join(QUANT_FTYPES)})")
    r.quant_types = list(dict.fromkeys(q.upper() for q in r.quant_types))
    for name in ("compute_dtype", "merge_dtype"):
        if getattr(r, name) not in DTYPES:
            raise BuildError(f"{name} must be one of {', '.join(DTYPES)}, got '{getattr(r, name)}'")
    if r.is_local_dataset and not dataset_path(r).is_file():
        raise BuildError(f"dataset file not found: {recipe_display_path(dataset_path(r))}")
    if r.is_local_dataset and not 0 < r.eval_fraction < 1:
        raise BuildError(f"eval_fraction must be between 0 and 1, got {r.eval_fraction}")
    if r.training_chat_template and not template_path(r).is_file():
        raise BuildError(f"training_chat_template not found: {recipe_display_path(template_path(r))}")
    if r.llama_cpp_dir and not (Path(r.llama_cpp_dir).expanduser() / "convert_hf_to_gguf.py").is_file():
        raise BuildError(f"llama_cpp_dir has no convert_hf_to_gguf.py: {r.llama_cpp_dir}")
    if not r.model_name_or_path:
        raise BuildError("model_name_or_path is empty: give a Hub id, a local folder or py:PACKAGE/FILE.gguf")
    if r.model_name_or_path.startswith("py:") and "/" not in r.model_name_or_path[3:]:
        raise BuildError(f"model_name_or_path '{r.model_name_or_path}' must look like py:PACKAGE/FILE.gguf")
    if r.hub_repo and r.hub_repo.count("/") != 1:
        raise BuildError(f"hub_repo must be 'namespace/name', got '{r.hub_repo}'")
    if not r.gguf_name or "/" in r.gguf_name:
        raise BuildError(f"gguf_name must be a plain file stem, got '{r.gguf_name}'")
    for name in (
        "max_length",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "save_steps",
        "eval_steps",
        "logging_steps",
        "lora_r",
        "eval_ctx",
        "sample_max_tokens",
        "compare_max_tokens",
    ):
        if getattr(r, name) <= 0:
            raise BuildError(f"{name} must be positive, got {getattr(r, name)}")
    if r.judge_model and not r.eval_base:
        raise BuildError("judge_model compares the fine-tune with its base: it needs eval_base true")
    if r.save_steps % r.eval_steps:
        # Trainer's load_best_model_at_end can only pick among checkpoints whose eval loss it knows.
        raise BuildError(
            f"save_steps ({r.save_steps}) must be a multiple of eval_steps ({r.eval_steps}): the build keeps the "
            "checkpoint with the best eval loss, so every checkpoint needs one"
        )


def template_path(r: Recipe) -> Path:
    p = Path(r.training_chat_template).expanduser()
    return p if p.is_absolute() else BUILD_DIR / p


def recipe_display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


# ---------------------------------------------------------------------------------------------------------------------
# Command line: run options + one `--field` per recipe field, grouped like the YAML banners
# ---------------------------------------------------------------------------------------------------------------------


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python build/run.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"Recipe name in build/recipes/ or a YAML path (default: {DEFAULT_RECIPE}).",
    )
    run.add_argument("--output-dir", "--output_dir", dest="output_dir", help="Output dir (default: outputs/<recipe>).")
    run.add_argument("--stages", help=f"Comma-separated subset of: {','.join(STAGES)} (default: all).")
    run.add_argument("--force", action="store_true", help="Redo the selected stages even if their outputs are valid.")
    hints = typing.get_type_hints(Recipe)
    for group in GROUPS:
        title = group.__name__.removesuffix("Arguments").lower()
        g = parser.add_argument_group(f"recipe: {title}")
        for f in dataclasses.fields(group):
            tp = hints[f.name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            opts = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            kw = dict(
                dest=f.name,
                default=argparse.SUPPRESS,
                help=f"{f.metadata['help']} (default: {default!r})".replace("%", "%%"),
            )
            if tp == list[str]:
                g.add_argument(*opts, nargs="*", metavar="V", **kw)
            elif tp is bool:
                g.add_argument(*opts, nargs="?", const="true", metavar="true|false", **kw)
            else:
                g.add_argument(*opts, metavar=tp.__name__.upper(), **kw)
    return parser


def parse_args(argv, description: str) -> tuple[argparse.Namespace, dict]:
    """Returns the run options and the recipe overrides given on the command line."""
    args = build_parser(description).parse_args(argv)
    fields = recipe_fields()
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    if args.stages:
        chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
        for s in chosen:
            if s not in STAGES:
                raise BuildError(f"unknown stage '{s}' (stages: {', '.join(STAGES)})")
        args.stages = [s for s in STAGES if s in chosen]
    else:
        args.stages = list(STAGES)
    return args, overrides
