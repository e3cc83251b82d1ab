"""What the engine needs from a decoding strategy, as a protocol (no import of ``decoders``).

Data flows one way: server -> engine -> decoders -> value_models / kernels. The server builds a
strategy object (``alignserve.decoders.build_decoder``) and hands it to the engine inside an
``EngineRequest``; the engine only calls the three members below.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .primitives import ForwardOut, Op

if TYPE_CHECKING:
    from .context import DecodeContext

StrategyRun = Generator[list[Op], list[ForwardOut], None]


@runtime_checkable
class Strategy(Protocol):
    """One decoding strategy instance per request (``alignserve.decoders.base.Decoder``).

    ``name`` labels logs and errors; ``slots_needed(n)`` is the request's worst-case KV-cache
    slots per model name (``{"base": n}`` for plain sampling), reserved at admission;
    ``run(ctx)`` is a generator that yields lists of forward operations and receives their
    outputs (``alignserve.engine.primitives``) until the request is finished.
    """

    name: str

    def slots_needed(self, n: int) -> dict[str, int]: ...

    def run(self, ctx: DecodeContext) -> StrategyRun: ...
