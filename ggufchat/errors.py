"""The exceptions whose message a visitor reads as a one-line notice in the chat (or an operator at start-up)."""


class ConfigError(Exception):
    """A setting or model file someone must fix; the message is one sentence saying what to do."""


class BadRequest(Exception):
    """Input that gets a plain answer in the chat instead of a generation."""


class Busy(Exception):
    """No room now (the waiting line is full, or the model's memory is): try again shortly."""


class EngineError(Exception):
    """An answer the engine (or the model server) had to end; the message is for the visitor."""
