"""ModelRunner: one model, its KV cache slots, and batched execution of forward operations.

``run(ops)`` turns a list of ``Extend``/``Tree`` operations (from any number of requests) into one
packed forward: every linear layer runs once over the real tokens of all rows (prefills and
decode rows together, no padding, so the weights are read once per step), and attention runs per
group of rows padded to a common query length. Rows are sorted by query length and merged into a
group while the padding they add stays under ``pad_budget`` tokens (padded queries cost attention
compute), so a long prefill gets its own attention call and the decode rows of all requests
share one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .model import AttnGroup, CausalLM, KVCache, ModelConfig, load_causal_lm
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
        if self.device.type == "cuda":
            # cuDNN's attention sets up every new key length anew: 3.1 ms of host time per call
            # on an H200 (docs/gpu_check_h200_before_fix.txt; 0.12 ms at a repeated length),
            # and decoding changes the length each step. Flash / memory-efficient attention
            # have no per-shape setup. Process-wide: the README's GPU section says so.
            torch.backends.cuda.enable_cudnn_sdp(False)
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
        if seq.length and out:
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
        groups: list[list[int]] = []
        group: list[int] = []
        for i in order:
            q = len(ops[i].tokens)
            # rows arrive in ascending length, so adding this one pads every row already in
            pad = sum(q - len(ops[j].tokens) for j in group)
            if group and pad > self.pad_budget:
                groups.append(group)
                group = []
            group.append(i)
        groups.append(group)
        outs = self._forward(ops, groups)
        for op in ops:  # sequences grow only after every op saw the pre-step state
            if isinstance(op, Extend):
                op.seq.tokens.extend(op.tokens)
        return outs

    def _attn_group(self, ops: list[Op], start: int) -> AttnGroup:
        """The attention call of rows ``ops`` (ascending query length) whose real tokens sit
        back to back from ``start`` in the packed batch."""
        b = len(ops)
        n = torch.tensor([len(op.tokens) for op in ops])
        q = int(n.max())
        total = int(n.sum())
        p0 = torch.tensor([op.seq.length for op in ops])
        qi = torch.arange(q)
        valid = qi[None] < n[:, None]  # [b, q]: real (unpadded) queries
        tree = torch.tensor([isinstance(op, Tree) for op in ops])
        lk = int((p0 + n).max())
        dev = self.device
        gather = keep = None
        if total != b * q:
            offsets = torch.cumsum(n, 0) - n  # each row's first packed token
            # padded queries read their row's last real token; their outputs are dropped
            gather = (start + offsets[:, None] + torch.minimum(qi[None], n[:, None] - 1))
            gather = gather.reshape(-1).to(dev)
            keep = valid.reshape(-1).nonzero().squeeze(1).to(dev)
        mask: Tensor | None = None
        if not (q == 1 and not bool(tree.any()) and bool((p0 == p0[0]).all())):
            # (decode rows of one length attend to every cached entry up to themselves: no mask)
            positions = p0[:, None] + qi[None] * (~tree[:, None])
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
        return AttnGroup(start=start, end=start + total, b=b, q=q, rows=rows, lk=lk, mask=mask,
                         gather=gather, keep=keep)

    def _forward(self, ops: list[Op], groups: list[list[int]]) -> list[ForwardOut]:
        """One packed forward over every op: linears over all real tokens at once, attention
        per group of rows (``AttnGroup``), one LM-head matmul for every position asked for."""
        dev = self.device
        order = [i for g in groups for i in g]
        attn, start = [], 0
        for g in groups:
            attn.append(self._attn_group([ops[i] for i in g], start))
            start = attn[-1].end
        tokens: list[int] = []
        positions: list[int] = []
        slot_t: list[int] = []
        write_t: list[int] = []
        first: dict[int, int] = {}  # op index -> its first packed token
        for i in order:
            op = ops[i]
            k, p = len(op.tokens), op.seq.length
            first[i] = len(tokens)
            tokens += op.tokens
            # a Tree's candidates all sit at position p; an Extend's tokens at p, p + 1, ...
            positions += [p] * k if isinstance(op, Tree) else range(p, p + k)
            slot_t += [op.seq.slot] * k
            write_t += range(p, p + k)
        hidden = self.model(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                            self.cache, torch.tensor(slot_t, device=dev),
                            torch.tensor(write_t, device=dev), attn)
        self.forwards += 1
        self.tokens_processed += len(tokens)
        # the positions each op wants, then one LM-head matmul for all of them
        picks: dict[int, list[int]] = {}
        for i in order:
            op = ops[i]
            k = len(op.tokens)
            every = isinstance(op, Tree) or op.logits == "all"
            picks[i] = list(range(first[i], first[i] + k)) if every else [first[i] + k - 1]
        flat = [j for i in order for j in picks[i]]
        if flat == list(range(len(tokens))):
            hsel = hidden  # decode: every token's state is wanted (no gather to build)
        else:
            hsel = hidden[torch.tensor(flat, device=dev)]
        want_logits = {i: not (isinstance(ops[i], Extend) and ops[i].logits == "none")
                       and not (isinstance(ops[i], Tree) and not ops[i].logits) for i in order}
        logits = self.model.logits(hsel) if any(want_logits.values()) else None
        results: list[ForwardOut | None] = [None] * len(ops)
        at = 0
        for i in order:
            sl = slice(at, at + len(picks[i]))
            at += len(picks[i])
            results[i] = ForwardOut(
                logits=logits[sl] if (want_logits[i] and logits is not None) else None,
                hidden=hsel[sl] if ops[i].hidden else None,
            )
        return results  # type: ignore[return-value]
