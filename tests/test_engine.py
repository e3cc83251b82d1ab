"""Engine primitives on the real SmolLM2 model: exact forwards, tree candidates, forks, batching."""

from __future__ import annotations

import pytest
import torch

from alignserve.decoders.sample import Sample
from alignserve.engine.primitives import Extend, Tree
from alignserve.engine.runner import ModelRunner
from alignserve.engine.sampling import SamplingParams
from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest

TEXT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def runner(model_dir):
    return ModelRunner("base", model_dir, slots=8, max_len=256)


@pytest.fixture(scope="module")
def ids(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(TEXT).input_ids


def test_logits_match_transformers(model_dir, runner, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    seq = runner.new_seq()
    [out] = runner.run([Extend(seq, ids, logits="all")])
    runner.free(seq)
    assert torch.allclose(out.logits, ref, atol=1e-3), (out.logits - ref).abs().max()


def test_tree_candidates_equal_separate_extends(runner, ids):
    """k candidates in one tree forward == extending k forked copies one token each."""
    seq = runner.new_seq()
    [pre] = runner.run([Extend(seq, ids)])
    cands = torch.topk(pre.logits[0], 5).indices.tolist()
    [tree] = runner.run([Tree(seq, cands, hidden=True)])
    assert seq.length == len(ids)  # candidates do not grow the sequence
    forks = runner.fork(seq, len(cands))
    outs = runner.run([Extend(f, [c], hidden=True) for f, c in zip(forks, cands)])
    ref = torch.cat([o.logits for o in outs])
    assert torch.allclose(tree.logits, ref, atol=1e-3), (tree.logits - ref).abs().max()
    assert torch.allclose(tree.hidden, torch.cat([o.hidden for o in outs]), atol=1e-3)
    # committing candidate 3 puts its K/V in place: the next step matches the forked path
    runner.commit(seq, 3, cands[3])
    nxt = int(tree.logits[3].argmax())
    [a] = runner.run([Extend(seq, [nxt])])
    [b] = runner.run([Extend(forks[3], [nxt])])
    assert torch.allclose(a.logits, b.logits, atol=1e-3)
    for s in [seq, *forks]:
        runner.free(s)


def test_rows_of_different_lengths_batch_like_alone(runner, ids):
    short = ids[:4]
    s1, s2 = runner.new_seq(), runner.new_seq()
    alone = [runner.run([Extend(s1, ids)])[0].logits, runner.run([Extend(s2, short)])[0].logits]
    runner.free(s1)
    runner.free(s2)
    s1, s2 = runner.new_seq(), runner.new_seq()
    runner.pad_budget = 10_000  # force one padded forward
    both = runner.run([Extend(s1, ids), Extend(s2, short)])
    runner.pad_budget = 24
    for a, b in zip(alone, both):
        assert torch.allclose(a, b.logits, atol=1e-3)
    # continuing both in one decode step agrees with continuing each alone
    step = runner.run([Extend(s1, [42]), Extend(s2, [42])])
    s3 = runner.new_seq()
    runner.run([Extend(s3, short)])
    [ref] = runner.run([Extend(s3, [42])])
    assert torch.allclose(step[1].logits, ref.logits, atol=1e-3)
    for s in (s1, s2, s3):
        runner.free(s)
    assert runner.num_free == 8


def test_prefill_decode_and_tree_share_one_forward(runner, ids):
    """A prefill, decode rows and a tree of candidates from different sequences run as one
    packed forward (weights read once) and give what each gives alone."""
    a, b, c = runner.new_seq(), runner.new_seq(), runner.new_seq()
    runner.run([Extend(a, ids[:5]), Extend(b, ids[:7])])
    [pre_c] = runner.run([Extend(c, ids[:3])])
    cands = torch.topk(pre_c.logits[0], 4).indices.tolist()
    # alone, on forks of the same prefixes
    fa, fb, fc = runner.fork(a, 1)[0], runner.fork(b, 1)[0], runner.fork(c, 1)[0]
    ref_a = runner.run([Extend(fa, [42])])[0].logits
    ref_b = runner.run([Extend(fb, ids[7:], logits="all")])[0].logits
    ref_c = runner.run([Tree(fc, cands, hidden=True)])[0]
    before = runner.forwards
    out_a, out_b, out_c = runner.run([Extend(a, [42]), Extend(b, ids[7:], logits="all"),
                                      Tree(c, cands, hidden=True)])
    assert runner.forwards == before + 1
    assert torch.allclose(out_a.logits, ref_a, atol=1e-3)
    assert out_b.logits.shape == (len(ids) - 7, ref_b.shape[1])
    assert torch.allclose(out_b.logits, ref_b, atol=1e-3)
    assert torch.allclose(out_c.logits, ref_c.logits, atol=1e-3)
    assert torch.allclose(out_c.hidden, ref_c.hidden, atol=1e-3)
    assert (a.length, b.length, c.length) == (6, len(ids), 3)
    for s in (a, b, c, fa, fb, fc):
        runner.free(s)


def test_fork_copies_prefix(runner, ids):
    seq = runner.new_seq()
    runner.run([Extend(seq, ids[:-1])])
    [f] = runner.fork(seq, 1)
    a, b = runner.run([Extend(seq, ids[-1:]), Extend(f, ids[-1:])])
    assert torch.equal(a.logits, b.logits) or torch.allclose(a.logits, b.logits, atol=1e-4)
    runner.free(seq)
    runner.free(f)


def test_an_engine_with_one_kv_slot_serves_plain_sampling(model_dir, engine):
    """A one-slot engine (``--slots 1``): plain sampling forks no copy (n = 1), which must not
    index the 1-slot cache with an empty slot list (torch refuses that overlap). Greedy, so
    it returns the same tokens as the 8-slot engine."""
    one = Engine(EngineConfig(model_dir=model_dir, slots=1, max_len=64, max_waiting=2))
    try:
        got = one.generate(_req(one, "1, 2, 3,", temperature=0, max_tokens=4, ignore_eos=True))
    finally:
        one.shutdown()
    want = engine.generate(_req(engine, "1, 2, 3,", temperature=0, max_tokens=4,
                                ignore_eos=True))
    assert len(got["choices"][0]["tokens"]) == 4
    assert got["choices"][0]["tokens"] == want["choices"][0]["tokens"]


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine(EngineConfig(model_dir=model_dir, slots=8, max_len=256, max_waiting=4))
    yield eng
    eng.shutdown()


def _req(engine, text, **kw):
    ids = engine.tokenizer(text).input_ids
    n = kw.pop("n", 1)
    return EngineRequest(prompt_ids=ids, params=SamplingParams(**kw), decoder=Sample(), n=n)


def test_seeded_sampling_is_batch_invariant(engine):
    """Same request + seed gives the same tokens alone and beside other requests."""
    alone = engine.generate(_req(engine, "Once upon a time", temperature=1.0, seed=7,
                                 max_tokens=12))
    import threading

    results = {}

    def go(i, text, seed):
        results[i] = engine.generate(_req(engine, text, temperature=1.0, seed=seed,
                                          max_tokens=12))

    ts = [threading.Thread(target=go, args=(i, t, s)) for i, (t, s) in enumerate(
        [("Once upon a time", 7), ("In a galaxy far away", 3), ("Dear diary,", 5)])]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results[0]["choices"][0]["tokens"] == alone["choices"][0]["tokens"]


def test_queue_limit_and_slot_limit(engine):
    from alignserve.engine.primitives import EngineError

    with pytest.raises(EngineError, match="slots"):
        engine.submit(_req(engine, "hi", max_tokens=2, n=9))


def test_max_tokens_and_stop(engine):
    r = engine.generate(_req(engine, "1, 2, 3,", temperature=0, max_tokens=10, stop=[" 6"]))
    ch = r["choices"][0]
    assert ch["finish_reason"] == "stop"
    assert " 6" not in ch["text"]
    r = engine.generate(_req(engine, "1, 2, 3,", temperature=0, max_tokens=3, ignore_eos=True))
    assert r["choices"][0]["finish_reason"] == "length"
    assert len(r["choices"][0]["tokens"]) == 3


def test_repeated_ngram_bans() -> None:
    """The tokens that would complete an n-gram already generated (HF no_repeat_ngram_size)."""
    from alignserve.engine.sampling import SamplingParams, build_adjust, repeated_ngram_bans

    h = [5, 6, 7, 5, 6]
    assert repeated_ngram_bans(h, 3) == {7}  # "5 6" was followed by 7
    assert repeated_ngram_bans(h, 2) == {7}  # "6" was followed by 7
    assert repeated_ngram_bans([5, 6, 5, 8, 5], 2) == {6, 8}
    assert repeated_ngram_bans(h, 1) == {5, 6, 7}
    assert repeated_ngram_bans(h, 4) == set() and repeated_ngram_bans(h, 0) == set()
    assert repeated_ngram_bans([], 2) == set()
    adj = build_adjust(SamplingParams(no_repeat_ngram_size=3), [h, [1, 2]], [], [0])
    assert adj is not None
    row = {int(t): float(b) for t, b in zip(adj.ids[0], adj.bias[0]) if t >= 0}
    assert row[7] == float("-inf") and all(b == 0 for t, b in row.items() if t != 7)
    assert not torch.isinf(adj.bias[1]).any()
    assert build_adjust(SamplingParams(), [h], [], [0]) is None


def test_heads_follow_their_inputs_device() -> None:
    """Heads load on the CPU; on an engine on another device (``--device cuda``) the first
    batched head call moves the head there instead of failing on mixed devices. Shown with
    PyTorch's ``meta`` device, which CI has (no GPU there)."""
    from alignserve.engine.primitives import HeadEval
    from alignserve.engine.scheduler import run_heads
    from alignserve.value_models.heads import ValueHead

    torch.manual_seed(0)
    head = ValueHead(16)
    x = torch.randn(3, 16, device="meta")
    outs = run_heads([HeadEval(head, (x[:2],)), HeadEval(head, (x[2:],))])
    assert [tuple(o.shape) for o in outs] == [(2,), (1,)]
    assert all(o.device.type == "meta" for o in outs)
    assert {t.device.type for t in (*head.parameters(), *head.buffers())} == {"meta"}
