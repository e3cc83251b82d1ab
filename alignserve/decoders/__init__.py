"""Decoding strategies, one module each, and ``build_decoder`` that picks one per request."""

from __future__ import annotations

import sys
from typing import Any

from .aligned import AlignedDecoder, AlignmentError
from .args import Args
from .base import Decoder
from .best_of_n import BestOfN
from .cd_block import CdBlock
from .deal import Deal
from .genarm import GenArm
from .sample import Sample
from .transfer_qstar import TransferQStar
from .vas import ControlledDecoding, Vas

STRATEGIES: dict[str, type[Decoder]] = {
    cls.name: cls
    for cls in (Sample, BestOfN, Args, Vas, ControlledDecoding, CdBlock, GenArm, TransferQStar,
                Deal)
}

__all__ = ["STRATEGIES", "AlignmentError", "Decoder", "build_decoder", "strategy_info"]


def build_decoder(alignment: dict[str, Any] | None, prompt_logprobs: bool = False,
                  registry: Any = None) -> Decoder:
    """Instantiate and validate the strategy a request asked for (plain sampling when none)."""
    spec = dict(alignment or {})
    name = spec.pop("strategy", "sample")
    cls = STRATEGIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise AlignmentError("alignment.strategy",
                             f"unknown strategy {name!r}; available: {sorted(STRATEGIES)}")
    if cls is Sample:
        if spec:
            raise AlignmentError(f"alignment.{sorted(spec)[0]}",
                                 "plain sampling takes no alignment options; pick a strategy")
        return Sample({"prompt_logprobs": prompt_logprobs})
    spec["prompt_logprobs"] = prompt_logprobs
    dec = cls(spec)
    assert isinstance(dec, AlignedDecoder)
    dec.bind(registry)
    return dec


def strategy_info(slots: int | None = None) -> list[dict[str, Any]]:
    """Each strategy with its parameters, defaults and ranges (JSON schema of its options).

    With ``slots`` (the server's ``--slots``) the ``maximum`` of each parameter that multiplies
    a request's KV-cache slots (``Decoder.slot_params``) is capped at the largest value that
    fits on its own: request ``n`` = 1 and the strategy's other slot parameters at their
    minimum. A larger combination is still refused with a 400 naming the field
    (``Decoder.check_slots``)."""
    out = []
    for name, cls in sorted(STRATEGIES.items()):
        schema = cls.Options.model_json_schema() if issubclass(cls, AlignedDecoder) else {}
        props = schema.get("properties", {})
        for refused in cls.refused_common() if issubclass(cls, AlignedDecoder) else ():
            props.pop(refused, None)  # a 400 for this strategy: not advertised
        for p in cls.slot_params if slots is not None else ():
            alone = cls({o: cls.param_range(o)[0] for o in cls.slot_params if o != p})
            m = alone.fit_max(p, 1, slots)
            if m < props[p]["maximum"]:
                props[p]["maximum"] = max(m, props[p].get("minimum", 1))
                props[p]["description"] = (props[p].get("description", "") +
                                           f"; at most {m} with this server's {slots} KV-cache "
                                           "slots (--slots)").lstrip("; ")
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
        out.append({"name": name, "streams": cls.streams, "description": doc,
                    "parameters": props})
    return out
