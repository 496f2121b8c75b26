"""A model's vocabulary through llama.cpp: tokenize text, spell tokens, tell control and end-of-generation tokens.

The engine (engine.py) reads tokens with it and the prompt tokenizer (prompt.py) builds prompts with it; neither
needs the other. A vocabulary comes from a loaded model, or from a vocab-only load of a GGUF in milliseconds.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


class Vocab:
    """A model's vocabulary: tokenize text, spell tokens, tell control and end-of-generation tokens.

    Holds the llama.cpp model it comes from (a whole model, or a vocab-only load of a GGUF) and keeps it alive.
    Reading a vocabulary is thread-safe in llama.cpp, so any thread may tokenize while another one decodes.
    """

    def __init__(self, model):  # llama_cpp._internals.LlamaModel
        import llama_cpp

        self.model = model
        self.ptr = llama_cpp.llama_model_get_vocab(model.model)
        self.n_tokens = llama_cpp.llama_vocab_n_tokens(self.ptr)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """The vocabulary of a GGUF file, without its weights."""
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        return cls(LlamaModel(path_model=str(path), params=params, verbose=False))

    @property
    def metadata(self) -> dict[str, str]:
        return self.model.metadata()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        import llama_cpp

        data = text.encode("utf-8")
        room = len(data) + 8  # at most one token per byte, plus what a tokenizer may add
        tokens = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self.ptr, data, len(data), tokens, room, False, special)
        if n < 0:
            raise ValueError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for inside a text (control tokens: none)."""
        import llama_cpp

        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, False)
        return buf.raw[:n] if n > 0 else b""

    def detokenize(self, tokens, special: bool = False) -> bytes:
        import llama_cpp

        buf, out = ctypes.create_string_buffer(256), bytearray()
        for token in tokens:
            n = llama_cpp.llama_token_to_piece(self.ptr, int(token), buf, len(buf), 0, special)
            out += buf.raw[: max(n, 0)]
        return bytes(out)

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.ptr, token))

    def attr(self, token: int) -> int:
        import llama_cpp

        return llama_cpp.llama_vocab_get_attr(self.ptr, token)

    def special_tokens(self) -> dict[str, tuple[int, int]]:
        """text -> (token id, llama_token_attr bits) of every token that only template text may produce."""
        import llama_cpp

        kinds = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        found: dict[str, tuple[int, int]] = {}
        for token in range(self.n_tokens):
            attr = self.attr(token)
            if attr & kinds and (text := self.text(token)):
                found.setdefault(text, (token, attr))
        return found

    def text(self, token: int) -> str:
        import llama_cpp

        return llama_cpp.llama_vocab_get_text(self.ptr, token).decode("utf-8", errors="replace")
