"""The local backbone of remote mode: a model on this machine that reads the same tokens as the
remote base, so value heads and ARMs (which read final hidden states) can guide a base model
served elsewhere (issue #14: ``vas``, ``cd``, ``genarm`` through the proxy).

It is the engine's own ``ModelRunner`` (KV-cache slots, ``Extend`` / ``Tree`` operations,
``commit``), driven from the event loop: every request's operations that arrive while a forward
runs are batched into the next ``ModelRunner.run`` call (one padded forward where the runner's
``pad_budget`` allows), on one worker thread, so concurrent requests share forwards as they do
in-process. The backbone is normally the base model itself (``--tokenizer DIR`` when that folder
holds the weights) or a smaller model with the same tokenizer (``--local-backbone DIR``); the
heads must have been trained on its hidden states (their manifest's tokenizer fingerprint and
hidden size are checked when they load).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..engine.primitives import EngineError, Extend, ForwardOut, Op, Seq, Tree
from ..engine.runner import ModelRunner

# room above the context window for one candidate tree (VAS scores up to 64 candidates)
TREE_ROOM = 64


class LocalBackbone:
    """A local model for hidden states, shared by every remote request (see the module docstring).

    ``slots`` sequences may live at once; a request that needs more waits (``acquire``) until
    others finish. All model work (forwards, ``commit``) runs on one worker thread, in order.
    """

    def __init__(self, model_dir: Path, slots: int = 32, max_len: int = 2048,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.runner = ModelRunner("base", self.model_dir, slots, max_len + TREE_ROOM, dtype,
                                  device)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignserve-backbone")
        self._pending: list[tuple[list[Op], asyncio.Future]] = []
        self._busy = False
        self._waiters: list[asyncio.Future] = []  # acquire calls waiting for free slots
        self.batches = 0  # runner.run calls (each one or a few padded forwards)

    @property
    def hidden_size(self) -> int:
        return int(self.runner.config.hidden_size)

    @property
    def embed(self) -> Tensor:
        """[V, D] output embedding (an ARM's adapter maps into logits with it)."""
        return self.runner.model.head_weight

    # ---- sequences -----------------------------------------------------------------------
    async def acquire(self, n: int) -> list[Seq]:
        """``n`` fresh sequences (KV-cache slots); waits while fewer are free.

        Raises ``EngineError`` if ``n`` exceeds the backbone's slots (it could never fit)."""
        if n > self.runner.cache.slots:
            raise EngineError(f"this request needs {n} local backbone slots; the server has "
                              f"{self.runner.cache.slots} (lower n)")
        while self.runner.num_free < n:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        return [self.runner.new_seq() for _ in range(n)]

    def release(self, seqs: list[Seq]) -> None:
        """Give the sequences' slots back and wake every ``acquire`` that waits."""
        for s in seqs:
            self.runner.free(s)
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def commit(self, seq: Seq, index: int, token: int) -> None:
        """Make tree candidate ``index`` the sequence's next token (``ModelRunner.commit``)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.pool, self.runner.commit, seq, index, token)

    # ---- forwards --------------------------------------------------------------------------
    async def run(self, ops: list[Op]) -> list[ForwardOut]:
        """Run ``ops`` (``Extend`` / ``Tree`` on this backbone's sequences); batched with every
        other request's operations that are waiting when the worker is free."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._pending.append((list(ops), fut))
        if not self._busy:
            self._busy = True
            asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                ok = []
                for ops, fut in batch:  # a cancelled request's sequences are freed already
                    bad = self._invalid(ops)
                    if fut.done():
                        continue
                    if bad:
                        fut.set_exception(EngineError(bad))
                    else:
                        ok.append((ops, fut))
                if not ok:
                    continue
                flat = [op for ops, _ in ok for op in ops]
                try:
                    outs = await loop.run_in_executor(self.pool, self.runner.run, flat)
                except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
                    for _, fut in ok:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.batches += 1
                pos = 0
                for ops, fut in ok:
                    part, pos = outs[pos:pos + len(ops)], pos + len(ops)
                    if not fut.done():
                        fut.set_result(part)
        finally:
            self._busy = False

    def _invalid(self, ops: list[Op]) -> str | None:
        for op in ops:
            if op.seq.slot < 0:
                return "operation on a freed backbone sequence"
            if op.seq.length + len(op.tokens) > self.runner.max_len:
                return (f"context window exceeded on the local backbone "
                        f"({op.seq.length + len(op.tokens)} > {self.runner.max_len} tokens)")
        return None

    # ---- conveniences for the strategies ---------------------------------------------------
    async def prefill(self, seqs: list[Seq], prompt: list[int]) -> Tensor:
        """Feed ``prompt`` to each of ``seqs``; [len(seqs), D] hidden states at its last token."""
        outs = await self.run([Extend(s, list(prompt), logits="none", hidden=True)
                               for s in seqs])
        return torch.cat([o.hidden for o in outs])  # type: ignore[misc]

    async def tree_hidden(self, seq: Seq, cands: list[int]) -> Tensor:
        """[k, D] final hidden states of ``cands`` as ``seq``'s next token (one tree forward)."""
        [out] = await self.run([Tree(seq, list(cands), logits=False, hidden=True)])
        assert out.hidden is not None
        return out.hidden

    async def extend(self, seq: Seq, token: int) -> Tensor:
        """Append ``token``; [1, D] hidden state at it."""
        [out] = await self.run([Extend(seq, [token], logits="none", hidden=True)])
        assert out.hidden is not None
        return out.hidden

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def has_weights(folder: Path) -> bool:
    """True when ``folder`` is a full model folder (config plus safetensors weights)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def describe(backbone: Any) -> str:
    return "none" if backbone is None else str(backbone.model_dir)
