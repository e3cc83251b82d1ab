"""The local backbone of remote mode (``alignserve.remote.backbone``) on the real model: batched
forwards across concurrent requests give each request what it would get alone, a cancelled
request's operations fail alone, and slots are waited for, not refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from alignserve.engine.primitives import EngineError, Extend
from alignserve.engine.runner import ModelRunner
from alignserve.remote.backbone import LocalBackbone, has_weights

PROMPTS = [[1, 504, 3125, 314, 253], [1, 2683, 28, 906]]


@pytest.fixture(scope="module")
def backbone(model_dir: Path) -> LocalBackbone:
    torch.manual_seed(0)
    return LocalBackbone(model_dir, slots=2, max_len=256)


def test_model_folder_has_weights(model_dir, tmp_path):
    assert has_weights(model_dir)
    assert not has_weights(tmp_path)


def test_concurrent_requests_match_alone(backbone, model_dir):
    ref = ModelRunner("ref", model_dir, slots=2, max_len=256)
    alone = []
    for p in PROMPTS:
        s = ref.new_seq()
        h_prompt = ref.run([Extend(s, p, logits="none", hidden=True)])[0].hidden
        alone.append(h_prompt)

    async def go() -> list[torch.Tensor]:
        seqs = await backbone.acquire(2)
        try:  # two requests at once: their prefills share the worker's next batch
            before = backbone.batches
            outs = await asyncio.gather(*(backbone.prefill([s], p)
                                          for s, p in zip(seqs, PROMPTS)))
            assert backbone.batches == before + 1
            hid = await backbone.tree_hidden(seqs[0], [11, 12, 13])
            assert hid.shape == (3, backbone.hidden_size)
            await backbone.commit(seqs[0], 1, 12)
            assert seqs[0].tokens[-1] == 12 and seqs[0].length == len(PROMPTS[0]) + 1
            return outs
        finally:
            backbone.release(seqs)

    outs = asyncio.run(go())
    for got, want in zip(outs, alone):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert backbone.runner.num_free == 2


def test_freed_sequence_fails_alone_and_slots_are_waited_for(backbone):
    async def go() -> None:
        a, b = await backbone.acquire(2)
        waiter = asyncio.ensure_future(backbone.acquire(1))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # no slot free: it waits instead of failing
        backbone.release([a])  # a cancelled request gives its slot back...
        [c] = await asyncio.wait_for(waiter, 10)
        bad, good = await asyncio.gather(backbone.run([Extend(a, [1])]),
                                         backbone.prefill([c], PROMPTS[1]),
                                         return_exceptions=True)
        assert isinstance(bad, EngineError) and "freed" in str(bad)  # ...its late op fails
        assert good.shape == (1, backbone.hidden_size)  # and the other request's does not
        backbone.release([b, c])
        with pytest.raises(EngineError, match="local backbone slots"):
            await backbone.acquire(3)

    asyncio.run(go())
    assert backbone.runner.num_free == 2
