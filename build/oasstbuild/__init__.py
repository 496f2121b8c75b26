"""The stages of `python build/run.py`: oasst1 -> QLoRA SFT -> merge -> GGUF -> quants -> evaluation -> Hub.

One module per stage plus the recipe, markers and per-architecture hooks. Importing the package (or any module in it)
loads only the standard library: torch & co. are imported inside the stages, so `run.py --help` stays instant.
"""
