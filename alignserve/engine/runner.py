"""ModelRunner: one model, its KV cache slots, and batched execution of forward operations.

``run(ops)`` turns a list of ``Extend``/``Tree`` operations (from any number of requests) into as
few padded forwards as makes sense: rows are sorted by query length and merged while the padding
they add stays under ``pad_budget`` tokens, because on a CPU every padded token costs compute
while every extra forward re-reads all weights. Long prefills therefore run alone and decode rows
of all requests share one forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .model import CausalLM, KVCache, ModelConfig, load_causal_lm
from .primitives import EngineError, Extend, ForwardOut, Op, Seq, Tree


class ModelRunner:
    def __init__(self, name: str, model_dir: Path | None, slots: int = 32, max_len: int = 2048,
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 pad_budget: int = 24, num_layers: int | None = None,
                 module: tuple[CausalLM, ModelConfig] | None = None) -> None:
        """Load ``model_dir`` (safetensors), or serve an already built ``module`` (e.g. the
        random-weight models of ``bench/gpu_check.py``)."""
        self.name = name
        self.device = torch.device(device)
        self.model: CausalLM
        self.config: ModelConfig
        if module is not None:
            self.model, self.config = module
            self.model.fuse()
        else:
            assert model_dir is not None
            self.model, self.config = load_causal_lm(model_dir, dtype=dtype, max_len=max_len,
                                                     num_layers=num_layers)
        self.model.to(self.device)
        self.max_len = max_len
        self.cache = KVCache(self.config, slots, max_len, dtype, self.device)
        self.free_slots = list(range(slots))
        self.pad_budget = pad_budget
        self.forwards = 0  # number of model forwards run (for metrics)
        self.tokens_processed = 0

    # ---- slot management -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def new_seq(self) -> Seq:
        if not self.free_slots:
            raise EngineError(f"{self.name}: no free KV-cache slot")
        self.free_slots.sort()
        return Seq(self.name, self.free_slots.pop(0))

    def free(self, seq: Seq) -> None:
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def fork(self, seq: Seq, n: int) -> list[Seq]:
        """n new sequences sharing ``seq``'s cached prefix (the cache rows are copied once)."""
        if n > self.num_free:
            raise EngineError(f"{self.name}: fork({n}) needs more free slots than {self.num_free}")
        out = [self.new_seq() for _ in range(n)]
        if seq.length:
            self.cache.copy_rows(seq.slot, [s.slot for s in out], seq.length)
        for s in out:
            s.tokens = list(seq.tokens)
        return out

    def commit(self, seq: Seq, index: int, token: int) -> None:
        """Accept tree candidate ``index`` (token ``token``) as the sequence's next token."""
        p = seq.length
        self.cache.move_position(seq.slot, p + index, p)
        seq.tokens.append(token)

    def truncate(self, seq: Seq, length: int) -> None:
        """Forget positions >= length (entries are overwritten by later writes)."""
        del seq.tokens[length:]

    # ---- execution -------------------------------------------------------------------------
    def run(self, ops: list[Op]) -> list[ForwardOut]:
        for op in ops:
            if op.seq.slot < 0:
                raise EngineError("operation on a freed sequence")
            if op.seq.length + len(op.tokens) > self.max_len:
                raise EngineError(f"context window exceeded ({op.seq.length + len(op.tokens)} > "
                                  f"{self.max_len} tokens)")
            if not op.tokens:
                raise EngineError("operation with no tokens")
        order = sorted(range(len(ops)), key=lambda i: (len(ops[i].tokens), ops[i].seq.slot))
        results: list[ForwardOut | None] = [None] * len(ops)
        group: list[int] = []
        for i in order:
            q = len(ops[i].tokens)
            # rows arrive in ascending length, so adding this one pads every row already in
            pad = sum(q - len(ops[j].tokens) for j in group)
            if group and pad > self.pad_budget:
                self._run_group([ops[j] for j in group], group, results)
                group = []
            group.append(i)
        if group:
            self._run_group([ops[j] for j in group], group, results)
        for op in ops:  # sequences grow only after every op saw the pre-step state
            if isinstance(op, Extend):
                op.seq.tokens.extend(op.tokens)
        return results  # type: ignore[return-value]

    def _run_group(self, ops: list[Op], idx: list[int], results: list[ForwardOut | None]) -> None:
        b = len(ops)
        q = max(len(op.tokens) for op in ops)
        lk = max(op.seq.length + len(op.tokens) for op in ops)
        dev = self.device
        p0 = torch.tensor([op.seq.length for op in ops])
        n = torch.tensor([len(op.tokens) for op in ops])
        tokens = torch.tensor([op.tokens + [0] * (q - len(op.tokens)) for op in ops])
        qi = torch.arange(q)
        valid = qi[None] < n[:, None]  # [B, Q]: real (unpadded) queries
        tree = torch.tensor([isinstance(op, Tree) for op in ops])
        # a Tree's candidates all sit at position p0; an Extend's tokens at p0, p0 + 1, ...
        positions = torch.where(valid, p0[:, None] + qi[None] * (~tree[:, None]), 0)
        write = torch.where(valid, p0[:, None] + qi[None], self.cache.scratch)
        mask: Tensor | None = None
        if q == 1 and not bool(tree.any()) and bool((p0 == p0[0]).all()):
            # decode rows of one length: each query attends to every cached entry up to itself
            pass
        else:
            kj = torch.arange(lk)[None, None]  # [1, 1, Lk]
            causal = kj <= positions[:, :, None]  # Extend: keys up to the query's own position
            own = (kj < p0[:, None, None]) | (kj == (p0[:, None] + qi[None])[:, :, None])
            m = torch.where(tree[:, None, None], own, causal) & valid[:, :, None]
            m[:, :, 0] |= ~valid  # padded queries attend to one real entry, never produce NaN
            mask = m[:, None].to(dev)
        slots = [op.seq.slot for op in ops]
        rows: Tensor | slice
        if slots == list(range(slots[0], slots[0] + b)):
            rows = slice(slots[0], slots[0] + b)
        else:
            rows = torch.tensor(slots, device=dev)
        hidden = self.model(tokens.to(dev), positions.to(dev), self.cache, rows, write.to(dev),
                            mask, lk)
        self.forwards += 1
        self.tokens_processed += sum(len(op.tokens) for op in ops)
        # gather the positions each op wants, then one LM-head matmul for the whole group
        picks: list[list[int]] = []
        for op in ops:
            k = len(op.tokens)
            every = isinstance(op, Tree) or op.logits == "all"
            picks.append(list(range(k)) if every else [k - 1])
        if all(len(p) == 1 and p[0] == q - 1 for p in picks):
            hsel = hidden[:, q - 1]  # decode: every row's last position (no gather to build)
        else:
            flat_rows = torch.tensor([r for r, p in enumerate(picks) for _ in p], device=dev)
            flat_pos = torch.tensor([i for p in picks for i in p], device=dev)
            hsel = hidden[flat_rows, flat_pos]
        want_logits = [not (isinstance(op, Extend) and op.logits == "none")
                       and not (isinstance(op, Tree) and not op.logits) for op in ops]
        logits = self.model.logits(hsel) if any(want_logits) else None
        start = 0
        for p, op, gi, wl in zip(picks, ops, idx, want_logits):
            sl = slice(start, start + len(p))
            start += len(p)
            results[gi] = ForwardOut(
                logits=logits[sl] if (wl and logits is not None) else None,
                hidden=hsel[sl] if op.hidden else None,
            )
