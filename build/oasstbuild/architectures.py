"""Per-architecture hooks, keyed by `config.model_type` (the llama.cpp converter's registry, in miniature).

An architecture the build has not been taught fails loudly here rather than training the wrong layers: the seed
project's notebooks targeted `q_proj/k_proj/v_proj/gate_proj/up_proj` on Phi-3, whose linear layers are fused, so
only `o_proj`/`down_proj` were ever adapted.
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import BuildError


@dataclass(frozen=True)
class Arch:
    model_type: str
    # Every linear layer of a decoder block: QLoRA adapts all of them (Dettmers et al. 2023, sec. 4).
    lora_targets: tuple[str, ...]
    # llama.cpp chooses tokenizer quirks from `general.name` (src/llama-vocab.cpp): the GGUF name must contain one.
    gguf_name_contains: tuple[str, ...] = ()
    # Files the converter reads that `save_pretrained` does not write (transformers 5 never writes tokenizer.model).
    required_tokenizer_files: tuple[str, ...] = ()

    def check_gguf_name(self, name: str) -> None:
        if self.gguf_name_contains and not any(s in name.lower() for s in self.gguf_name_contains):
            raise BuildError(
                f"gguf_name '{name}' must contain one of {self.gguf_name_contains} for {self.model_type}: llama.cpp "
                "picks this architecture's special-token whitespace rules from the model name"
            )


ARCHS: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    ARCHS[arch.model_type] = arch
    return arch


_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

register(Arch("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("phi-3", "phi3"), ("tokenizer.model",)))
register(Arch("llama", _LLAMA_LINEARS))
register(Arch("mistral", _LLAMA_LINEARS))
register(Arch("qwen2", _LLAMA_LINEARS))


def get_arch(model_type: str) -> Arch:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise BuildError(
            f"no build hooks for architecture '{model_type}' (known: {', '.join(ARCHS)}): "
            "add one in build/oasstbuild/architectures.py"
        ) from None
