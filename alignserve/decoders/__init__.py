"""Decoding strategies, one module each, and ``build_decoder`` that picks one per request."""

from __future__ import annotations

from typing import Any

from .base import Decoder
from .sample import Sample

STRATEGIES: dict[str, type[Decoder]] = {
    Sample.name: Sample,
}


class AlignmentError(ValueError):
    """An invalid ``alignment`` field; ``field`` is the dotted path reported in the 400."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def build_decoder(alignment: dict[str, Any] | None, prompt_logprobs: bool = False) -> Decoder:
    """Instantiate the strategy a request asked for (plain sampling when none)."""
    spec = dict(alignment or {})
    name = spec.pop("strategy", "sample")
    cls = STRATEGIES.get(name)
    if cls is None:
        raise AlignmentError("alignment.strategy",
                             f"unknown strategy {name!r}; available: {sorted(STRATEGIES)}")
    spec["prompt_logprobs"] = prompt_logprobs
    return cls(spec)
