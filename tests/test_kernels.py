"""Triton guided-sampling kernel vs its torch reference (SPEC.md), on CPU via the interpreter.

Every comparison test draws random inputs from a seed fixed per test (a CRC of the test's id),
so the suite gives the same verdict on every run. The seed is printed in the failure message,
and ``ALIGNSERVE_TEST_SEED=<seed>`` replays it; ``ALIGNSERVE_TEST_SEED=random`` draws a fresh
seed per test, to search for failing cases by hand (run the file in a loop).
"""

from __future__ import annotations

import os
import zlib

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

from alignserve.kernels.guided_sample import (  # noqa: E402
    LogitAdjust,
    SampleOut,
    apply_adjust,
    guided_sample,
    guided_sample_torch,
    hash_u32,
    hash_uniform,
    resolve_backend,
)

triton = pytest.importorskip("triton")
from alignserve.kernels.triton_guided_sample import hash_uniform_triton  # noqa: E402

FIELDS = ("tokens", "logprobs", "base_logprobs", "top_ids", "top_logprobs")

# (temperature, top_k, top_p); None = drawn at random. Rows cycle through these so every
# batch mixes greedy and sampled rows with different filters, as the engine will.
ROW_SETTINGS: list[tuple[float | None, int | None, float | None]] = [
    (0.0, 0, 1.0),  # greedy
    (None, 0, 1.0),  # plain sampling
    (None, 1, 1.0),  # top_k = 1
    (None, None, None),  # top-k and top-p
    (None, 0, 1e-6),  # tiny top_p: argmax group only
    (None, None, 1.0),  # top-k only
    (None, 0, None),  # top-p only
    (0.0, 7, 0.5),  # greedy ignores the filters
    (1.0, None, None),
]


def _fresh_seed() -> int:
    """The current test's seed: ``ALIGNSERVE_TEST_SEED`` if set (an int, or ``random``), else a
    CRC-32 of the test's node id, so each test (and each parametrisation) has its own fixed one."""
    env = os.environ.get("ALIGNSERVE_TEST_SEED", "")
    if env == "random":
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    if env:
        try:
            return int(env)
        except ValueError:
            pytest.fail(f"ALIGNSERVE_TEST_SEED={env!r}: expected an integer or 'random'",
                        pytrace=False)
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    return zlib.crc32(test_id.encode()) & 0x7FFFFFFF


def _make_case(
    seed: int,
    b: int,
    v: int,
    h: int,
    *,
    sparse: bool,
    dense: bool = True,
    ties: bool = False,
    neg_inf: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Random inputs; with ``ties`` every value is a small dyadic rational so sums are exact
    in any order and equal logits stay exactly equal on both paths."""
    gen = torch.Generator().manual_seed(seed)
    if ties:
        logits = torch.randint(-3, 4, (b, v), generator=gen).float()
    else:
        logits = torch.randn(b, v, generator=gen) * 3.0
    if neg_inf:
        logits[torch.rand(b, v, generator=gen) < 0.1] = float("-inf")
        if b > 2:  # a row with only three finite tokens: k and n_top exceed them
            logits[2] = float("-inf")
            logits[2, torch.randperm(v, generator=gen)[:3]] = torch.tensor([1.0, 0.5, 0.5])
    weights = dense_t = cand_scores = cand_ids = None
    if h > 0:
        if ties:
            weights = torch.randint(1, 5, (b, h), generator=gen).float() / 4
        else:
            weights = torch.rand(b, h, generator=gen) * 2 - 0.5
        if dense:
            if ties:
                dense_t = torch.randint(-4, 5, (b, h, v), generator=gen).float() / 4
            else:
                dense_t = torch.randn(b, h, v, generator=gen)
        if sparse:
            k = 9
            cand_ids = torch.randint(0, v, (b, k), generator=gen)
            cand_ids[:, -2:] = -1  # padding
            cand_ids[:, 3] = cand_ids[:, 0]  # a duplicate accumulates twice
            if ties:
                cand_scores = torch.randint(-8, 9, (b, h, k), generator=gen).float() / 4
            else:
                cand_scores = torch.randn(b, h, k, generator=gen) * 2
    temp, top_k, top_p = [], [], []
    offset = int(torch.randint(0, len(ROW_SETTINGS), (1,), generator=gen))
    for r in range(b):
        t, k_, p = ROW_SETTINGS[(r + offset) % len(ROW_SETTINGS)]
        temp.append(t if t is not None else float(torch.rand(1, generator=gen)) * 1.3 + 0.2)
        top_k.append(k_ if k_ is not None else int(torch.randint(2, v, (1,), generator=gen)))
        top_p.append(p if p is not None else float(torch.rand(1, generator=gen)) * 0.7 + 0.25)
    return {
        "logits": logits,
        "weights": weights,
        "dense": dense_t,
        "cand_scores": cand_scores,
        "cand_ids": cand_ids,
        "temperature": torch.tensor(temp),
        "top_k": torch.tensor(top_k, dtype=torch.int64),
        "top_p": torch.tensor(top_p),
        "noise_seed": torch.randint(0, 2**31, (b,), generator=gen),
    }


def _assert_same(ref: SampleOut, out: SampleOut, seed: int, atol: float = 1e-6) -> None:
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(out, name)
        msg = f"{name} differs (ALIGNSERVE_TEST_SEED={seed})"
        assert a.shape == b.shape and a.dtype == b.dtype, msg
        if a.dtype == torch.int64:
            assert torch.equal(a, b), f"{msg}\nref={a}\nkernel={b}"
        else:
            # 1e-5 relative; the absolute floor only matters for logprobs near 0.
            torch.testing.assert_close(
                b, a, rtol=1e-5, atol=atol, msg=lambda m, msg=msg: f"{msg}\n{m}"
            )


def _run_both(case: dict[str, torch.Tensor | None], n_top: int) -> tuple[SampleOut, SampleOut]:
    ref = guided_sample(**case, n_top=n_top, backend="torch")
    out = guided_sample(**case, n_top=n_top, backend="triton")
    return ref, out


# --------------------------------------------------------------------------------------------
# Kernel == reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "v", "h", "sparse", "ties", "neg_inf", "n_top"),
    [
        (1, 1003, 0, False, False, False, 3),
        (7, 1003, 1, False, False, True, 5),
        (7, 1003, 4, True, False, False, 20),
        (7, 1003, 2, True, True, True, 8),
        (9, 1003, 4, False, True, False, 4),
        (64, 1003, 2, True, False, True, 2),
        (64, 257, 1, False, True, False, 0),
    ],
)
def test_kernel_matches_reference(
    b: int, v: int, h: int, sparse: bool, ties: bool, neg_inf: bool, n_top: int
) -> None:
    seed = _fresh_seed()
    case = _make_case(seed, b, v, h, sparse=sparse, ties=ties, neg_inf=neg_inf)
    ref, out = _run_both(case, n_top)
    _assert_same(ref, out, seed)


def test_sparse_only_guidance() -> None:
    """Candidates without a dense score tensor (H > 0, dense=None)."""
    seed = _fresh_seed()
    case = _make_case(seed, 7, 1003, 2, sparse=True, dense=False)
    ref, out = _run_both(case, 4)
    _assert_same(ref, out, seed)


@pytest.mark.parametrize("row", [0, 3])
def test_kernel_large_vocab(row: int) -> None:
    """V = 49152 (several blocks per row): one greedy and one top-k + top-p row.

    Each logprob subtracts a log-sum-exp over 49152 float32 terms, which the kernel sums block
    by block and torch in its own order; the two differ by up to ~9e-6 in absolute terms
    (measured over seeds 0-39, both rows), more than 1e-5 relative allows for a logprob near
    -0.7. Hence an absolute tolerance of 3e-5 here; token ids must still match exactly."""
    seed = _fresh_seed()
    case = _make_case(seed, 9, 49152, 2, sparse=True, neg_inf=True)
    one = {k: (t[row : row + 1] if t is not None else None) for k, t in case.items()}
    one["temperature"] = torch.tensor([0.0 if row == 0 else 0.8])
    ref, out = _run_both(one, 5)
    _assert_same(ref, out, seed, atol=3e-5)


def test_tie_semantics_by_hand() -> None:
    """Hand-checkable SPEC tie rules on both paths."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0, float("-inf"), 2.0]])
    none = (None, None, None, None)
    for backend in ("torch", "triton"):

        def run(t: float, k: int, p: float, n_top: int = 0, backend: str = backend) -> SampleOut:
            return guided_sample(
                logits,
                *none,
                torch.tensor([t]),
                torch.tensor([k]),
                torch.tensor([p]),
                torch.tensor([5]),
                n_top=n_top,
                backend=backend,
            )

        greedy = run(0.0, 0, 1.0, n_top=8)
        assert greedy.tokens.item() == 1, backend  # lowest index among the tied maxima
        assert greedy.top_ids.tolist() == [[1, 3, 2, 4, 7, 0, 5, 6]], backend
        # top_k = 1 keeps both 3.0 tokens, each with probability 1/2.
        out = run(1.0, 1, 1.0, n_top=3)
        assert out.tokens.item() in (1, 3), backend
        assert out.logprobs.item() == pytest.approx(-0.693147, abs=1e-5), backend
        assert out.top_logprobs[0, 2].item() == float("-inf"), backend
        # top_k = 2: the 2nd largest z is 3.0, so only the two 3.0 tokens stay.
        assert run(1.0, 2, 1.0, n_top=3).top_logprobs[0, 2].item() == float("-inf")
        # top_k = 3 reaches the 2.0 group: all three 2.0 tokens survive (5 kept).
        kept = torch.isfinite(run(1.0, 3, 1.0, n_top=8).top_logprobs).sum().item()
        assert kept == 5, backend
        # tiny top_p: only the argmax group (mass above it is 0).
        out = run(1.0, 0, 1e-6, n_top=3)
        assert torch.isfinite(out.top_logprobs).sum().item() == 2, backend


def test_batch_composition_invariance() -> None:
    """A row draws the same token alone or inside a batch (counter-based noise)."""
    seed = _fresh_seed()
    case = _make_case(seed, 7, 1003, 1, sparse=False)
    full = guided_sample(**case, backend="triton")
    for r in (1, 3):
        one = {k: (t[r : r + 1] if t is not None else None) for k, t in case.items()}
        alone = guided_sample(**one, backend="triton")
        assert alone.tokens.item() == full.tokens[r].item(), f"seed={seed}"


# --------------------------------------------------------------------------------------------
# Sampling distribution
# --------------------------------------------------------------------------------------------


def _chi_square_case(seed: int, n: int) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
    """n copies of one V=8 row (guidance, T, top-k and top-p active), distinct noise seeds.
    Returns the case and the processed distribution (from the reference's top_logprobs)."""
    gen = torch.Generator().manual_seed(seed)
    v = 8
    logits = torch.linspace(2.0, -1.5, v)[torch.randperm(v, generator=gen)]
    dense = torch.randn(1, 1, v, generator=gen) * 0.3
    case: dict[str, torch.Tensor | None] = {
        "logits": logits.expand(n, v).contiguous(),
        "weights": torch.full((n, 1), 0.5),
        "dense": dense.expand(n, 1, v).contiguous(),
        "cand_scores": None,
        "cand_ids": None,
        "temperature": torch.full((n,), 0.9),
        "top_k": torch.full((n,), 6, dtype=torch.int64),
        "top_p": torch.full((n,), 0.95),
        # Distinct seeds: an odd stride is a bijection modulo 2**31.
        "noise_seed": (
            int(torch.randint(0, 2**31, (1,), generator=gen)) + torch.arange(n) * 2654435761
        )
        % 2**31,
    }
    row0 = {k: (t[:1] if t is not None else None) for k, t in case.items()}
    ref = guided_sample_torch(**row0, n_top=v)
    probs = torch.zeros(v, dtype=torch.float64)
    probs[ref.top_ids[0]] = ref.top_logprobs[0].double().exp()
    return case, probs


def _chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor, seed: int) -> float:
    from scipy.stats import chisquare

    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    kept = probs > 0
    assert kept.sum() >= 3, f"degenerate distribution (seed={seed})"
    assert counts[~kept].sum() == 0, f"masked token sampled (seed={seed})"
    expected = probs[kept] / probs[kept].sum() * counts.sum()
    return float(chisquare(counts[kept].numpy(), expected.numpy()).pvalue)


def test_reference_sampling_follows_processed_distribution() -> None:
    seed = _fresh_seed()
    case, probs = _chi_square_case(seed, 40000)
    out = guided_sample_torch(**case)
    pvalue = _chi_square_pvalue(out.tokens, probs, seed)
    assert pvalue > 1e-4, f"chi-square p={pvalue:.2e} (ALIGNSERVE_TEST_SEED={seed})"


def test_triton_sampling_follows_processed_distribution() -> None:
    seed = _fresh_seed()
    case, probs = _chi_square_case(seed, 300)
    out = guided_sample(**case, backend="triton")
    ref = guided_sample_torch(**case)
    assert torch.equal(out.tokens, ref.tokens), f"seed={seed}"
    pvalue = _chi_square_pvalue(out.tokens, probs, seed)
    assert pvalue > 1e-4, f"chi-square p={pvalue:.2e} (ALIGNSERVE_TEST_SEED={seed})"


# --------------------------------------------------------------------------------------------
# Hash and dispatcher
# --------------------------------------------------------------------------------------------


def test_hash_bit_identical_and_uniform() -> None:
    from scipy.stats import chisquare

    seed = _fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.cat(
        [torch.tensor([0, 1, 2**31 - 1]), torch.randint(0, 2**31, (5,), generator=gen)]
    )
    n = 5003
    u_torch = hash_uniform(seeds[:, None], torch.arange(n)[None, :])
    u_triton = hash_uniform_triton(seeds, n)
    assert u_torch.dtype == torch.float32, f"seed={seed}"
    assert torch.equal(u_torch.view(torch.int32), u_triton.view(torch.int32)), f"seed={seed}"
    assert (u_torch > 0).all() and (u_torch < 1).all(), f"seed={seed}"
    # Extremes of the 23-bit grid still map strictly inside (0, 1).
    assert 0.0 < (0 + 0.5) * 2.0**-23 and (2**23 - 1 + 0.5) * 2.0**-23 < 1.0
    h = hash_u32(seeds[:, None], torch.arange(n)[None, :])
    assert int(h.min()) >= 0 and int(h.max()) < 2**32, f"seed={seed}"
    counts = torch.histc(u_torch.flatten(), bins=32, min=0.0, max=1.0)
    pvalue = float(chisquare(counts.numpy()).pvalue)
    assert pvalue > 1e-4, f"hash not uniform: p={pvalue:.2e} (seed={seed})"
    # Neighbouring seeds give unrelated streams.
    corr = torch.corrcoef(torch.stack([u_torch[0], u_torch[1]]))[0, 1].abs().item()
    assert corr < 0.1, f"neighbouring seeds correlate: {corr:.3f} (seed={seed})"


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv("ALIGNSERVE_SAMPLER", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    monkeypatch.setenv("ALIGNSERVE_SAMPLER", "triton")
    assert resolve_backend("auto", cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch"  # an explicit argument wins
    monkeypatch.setenv("ALIGNSERVE_SAMPLER", "bogus")
    with pytest.raises(ValueError):
        resolve_backend("auto", cpu)
    with pytest.raises(ValueError):
        resolve_backend("cuda", cpu)


def test_auto_on_cpu_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGNSERVE_SAMPLER", raising=False)
    seed = _fresh_seed()
    case = _make_case(seed, 7, 257, 1, sparse=True)
    auto = guided_sample(**case, n_top=3)
    ref = guided_sample_torch(**case, n_top=3)
    for name in FIELDS:
        assert torch.equal(getattr(auto, name), getattr(ref, name)), f"{name} (seed={seed})"


def test_input_validation() -> None:
    case = _make_case(0, 2, 16, 1, sparse=False)
    with pytest.raises(ValueError):
        guided_sample(**case, n_top=17)
    bad = dict(case, top_k=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        guided_sample(**bad)


def test_fast_row_hash_is_bit_identical_to_definition():
    """The int32 hot-path hash must give exactly the uint32 definition's uniforms."""
    from alignserve.kernels.guided_sample import gumbel_uniform_rows

    gen = torch.Generator().manual_seed(1234)
    seeds = torch.cat([torch.randint(0, 2**31 - 1, (13,), generator=gen),
                       torch.tensor([0, 1, 2**31 - 2])])
    for v in (1, 1003, 49152):
        ref = hash_uniform(seeds[:, None], torch.arange(v)[None, :])
        assert torch.equal(gumbel_uniform_rows(seeds, v), ref)


# --------------------------------------------------------------------------------------------
# Step 0 (penalties, logit bias) and step 1b (candidate restriction)
# --------------------------------------------------------------------------------------------


def _make_adjust(seed: int, b: int, v: int, j: int) -> LogitAdjust:
    """Random distinct ids per row (with padding), counts, seen flags, biases and penalties;
    one row bans a token with -inf as ``min_tokens`` does."""
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.stack([torch.randperm(v, generator=gen)[:j] for _ in range(b)])
    ids[torch.rand(b, j, generator=gen) < 0.2] = -1
    counts = torch.randint(0, 4, (b, j), generator=gen).float()
    seen = (counts > 0) | (torch.rand(b, j, generator=gen) < 0.3)
    bias = torch.where(torch.rand(b, j, generator=gen) < 0.5,
                       torch.randn(b, j, generator=gen) * 5, torch.zeros(b, j))
    bias[0, 0] = float("-inf")
    return LogitAdjust(ids=ids, counts=counts, seen=seen, bias=bias,
                       presence=torch.rand(b, generator=gen) * 4 - 2,
                       frequency=torch.rand(b, generator=gen) * 4 - 2,
                       repetition=torch.where(torch.arange(b) % 3 == 0, torch.ones(b),
                                              0.5 + torch.rand(b, generator=gen) * 1.5))


@pytest.mark.parametrize(("b", "v", "h", "sparse", "restrict"), [
    (7, 1003, 0, False, False),
    (7, 1003, 2, True, False),
    (9, 1003, 2, True, True),
    (5, 257, 3, False, False),
])
def test_adjust_and_restrict_match_reference(b: int, v: int, h: int, sparse: bool,
                                             restrict: bool) -> None:
    seed = _fresh_seed()
    case = _make_case(seed, b, v, h, sparse=sparse)
    case["adjust"] = _make_adjust(seed, b, v, 40)
    if restrict:
        case["restrict"] = torch.arange(b) % 2 == 0  # mixed restricted and free rows
    ref, out = _run_both(case, 4)
    _assert_same(ref, out, seed)
    if restrict:  # a restricted row never returns a token outside its candidates
        for r in range(0, b, 2):
            assert int(ref.tokens[r]) in case["cand_ids"][r].tolist(), f"seed={seed}"


def test_adjust_semantics_by_hand() -> None:
    """OpenAI's presence/frequency, vLLM's repetition penalty and logit bias, hand-computed."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0]])
    adj = LogitAdjust(ids=torch.tensor([[0, 1, 3, -1]]), counts=torch.tensor([[2.0, 0, 0, 0]]),
                      seen=torch.tensor([[True, True, False, False]]),
                      bias=torch.tensor([[0.0, 0.0, 5.0, 0.0]]),
                      presence=torch.tensor([0.5]), frequency=torch.tensor([0.25]),
                      repetition=torch.tensor([2.0]))
    want = torch.tensor([[2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2, 0.5, 1.0 + 5.0, 0.0]])
    torch.testing.assert_close(apply_adjust(logits, adj), want)
    for backend in ("torch", "triton"):
        one = dict(temperature=torch.zeros(1), top_k=torch.zeros(1, dtype=torch.int64),
                   top_p=torch.ones(1), noise_seed=torch.zeros(1, dtype=torch.int64))
        out = guided_sample(logits, None, None, None, None, **one, adjust=adj, backend=backend)
        assert int(out.tokens[0]) == 3  # the +5 bias wins the argmax
        # restricted to candidates {1, 4}: 4 wins although 3 is the global argmax
        w = torch.ones(1, 1)
        out = guided_sample(logits, w, None, torch.zeros(1, 1, 2), torch.tensor([[1, 4]]),
                            **one, adjust=adj, restrict=torch.tensor([True]), backend=backend)
        assert int(out.tokens[0]) == 4
        torch.testing.assert_close(out.logprobs, torch.tensor([0.0 - torch.logsumexp(
            torch.tensor([-2.0, 0.0]), 0).item()]))
