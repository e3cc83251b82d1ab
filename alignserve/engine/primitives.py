"""The primitives the scheduler offers to decoding strategies.

A strategy (``alignserve.decoders``) is a generator. Each time it needs the model it *yields* a
list of forward operations and receives, in the same order, one ``ForwardOut`` per operation. The
scheduler collects the operations of every running request, runs them as few batched forwards as
it can (rows of different requests and strategies share one forward), and resumes each generator
with its results. Everything else a strategy needs — creating, forking and freeing sequences,
sampling with per-row parameters, emitting tokens — goes through ``DecodeContext`` methods that
never run the model. This keeps strategies short and lets one step serve many requests.

Operations:
- ``Extend(seq, tokens)``: append tokens causally (prefill, decode, rollout). ``logits`` chooses
  which positions' next-token logits come back ("last", "all", "none"); ``hidden`` asks for the
  final hidden states of the same positions (value heads read them).
- ``Tree(seq, tokens)``: score k candidate next tokens in one forward on top of the shared prefix.
  Every candidate sits at position ``len(seq)`` and attends to the prefix and itself only (the
  verification step of speculative decoding). The sequence does not grow; ``ctx.commit(seq, i)``
  then makes candidate i the next token without another forward (its K/V entry is moved into
  place) and the candidate's logits are the next step's logits.

Host operations, batched by the scheduler across every running request in one step:
- ``Sample``: one token per row with per-row settings (``DecodeContext.sample`` builds it). All
  ``Sample`` ops of a step run as ONE fused sampler call, with one device-to-host transfer.
- ``Score``: a reward source on texts. All ``Score`` ops of a step that name the same source run
  as one batched call of that source.
- ``HeadEval``: a guidance head (value head, ARM) on hidden states. All ``HeadEval`` ops of a
  step that name the same module, method and shared arguments run as ONE call of that module
  on their rows concatenated.
A strategy receives a ``SampleOut`` (CPU tensors, its rows only), a float64 ``np.ndarray``
(``Score``) or the head's output rows (``HeadEval``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor


@dataclass(eq=False)
class Seq:
    """A sequence in a model's KV cache: one slot, ``length`` cached positions, its token ids."""

    model: str
    slot: int
    tokens: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class Extend:
    seq: Seq
    tokens: list[int]
    logits: Literal["last", "all", "none"] = "last"
    hidden: bool = False


@dataclass
class Tree:
    seq: Seq
    tokens: list[int]
    logits: bool = True
    hidden: bool = False


@dataclass(eq=False)
class Sample:
    """Sample one token for each of R rows (SPEC of ``kernels/guided_sample.py``).

    ``logits`` [R, V] float; ``gens`` one generator per row (each draws one noise seed);
    ``temperature``/``top_k``/``top_p`` scalars for all R rows; ``adjust`` a ``LogitAdjust``
    for the R rows or None; guidance ``weights`` [R, H], ``dense`` [R, H, V], ``cand_scores``
    [R, H, K], ``cand_ids`` [R, K]; ``restrict`` samples only among ``cand_ids``; ``n_top``
    top entries to return.
    """

    logits: Tensor
    gens: list[torch.Generator]
    temperature: float
    top_k: int
    top_p: float
    adjust: Any = None
    weights: Tensor | None = None
    dense: Tensor | None = None
    cand_scores: Tensor | None = None
    cand_ids: Tensor | None = None
    restrict: bool = False
    n_top: int = 0

    @property
    def rows(self) -> int:
        return int(self.logits.shape[0])


@dataclass(eq=False)
class Score:
    """Score ``texts`` (answers to ``prompts``) with the reward source ``source`` of the
    request's registry; ``options`` one dict per text. Result: float64 array [len(texts)]."""

    source: str
    prompts: list[str]
    texts: list[str]
    options: list[dict[str, Any]]
    registry: Any = None


@dataclass(eq=False)
class HeadEval:
    """``getattr(module, method)(*inputs, *shared)`` for R rows: each tensor of ``inputs`` is
    [R, ...] (rows of different requests are concatenated along dim 0, so the module must
    treat rows independently), ``shared`` are the same objects for every row (e.g. the
    embedding matrix). Result: the call's output rows for this op, [R, ...]."""

    module: Any
    inputs: tuple[Tensor, ...]
    method: str = "forward"
    shared: tuple[Any, ...] = ()

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0])

    @property
    def group(self) -> tuple:
        """Ops with the same key run as one call: same module, method, shared objects, and
        inputs that concatenate (trailing shapes, dtypes, devices)."""
        return (id(self.module), self.method, tuple(id(x) for x in self.shared),
                tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in self.inputs))


Op = Extend | Tree
HostOp = Sample | Score | HeadEval


@dataclass
class ForwardOut:
    """Results for one operation: ``logits`` [Q', V] float32 and/or ``hidden`` [Q', D]."""

    logits: Tensor | None
    hidden: Tensor | None


class EngineError(RuntimeError):
    """A request cannot be served (e.g. it would overflow the context window)."""
