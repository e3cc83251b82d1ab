"""Alignment strategies on the real model and real rewards, on held-out prompts.

Each strategy must raise the mean of its target reward above plain sampling by more than the
seed-to-seed spread of plain sampling; weights must act monotonically; all-zero weights must
reproduce plain sampling token for token; bad parameters must be 400s naming the field.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import MODEL, ROOT

from alignserve.data.prompts import load_prompts
from alignserve.decoders import build_decoder
from alignserve.decoders.aligned import AlignmentError
from alignserve.engine.sampling import SamplingParams
from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest
from alignserve.value_models.heads import tokenizer_fingerprint
from alignserve.value_models.registry import Registry

N_PROMPTS = 16
MAX_TOKENS = 16
HEADS = ROOT / "alignserve" / "value_models" / "default_heads"


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    eng = Engine(EngineConfig(model_dir=model_dir, slots=96, max_len=512, max_waiting=256))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def registry(engine):
    heads = HEADS if any(HEADS.glob("*/manifest.json")) else None
    return Registry.build(heads, tokenizer_fingerprint(engine.tokenizer),
                          engine.base.config.hidden_size)


def chat_prompts(engine, suite: str) -> list[tuple[str, list[int]]]:
    """The first N_PROMPTS test prompts of ``suite`` as chat requests: (text, token ids)."""
    tok = engine.tokenizer
    out = []
    for p in load_prompts("test", suite)[:N_PROMPTS]:
        text = tok.apply_chat_template([{"role": "user", "content": p.text}],
                                       add_generation_prompt=True, tokenize=False)
        out.append((text, tok(text, add_special_tokens=False).input_ids))
    return out


@pytest.fixture(scope="module")
def prompts(engine):
    return chat_prompts(engine, "mixed")


def run_all(engine, registry, prompts, alignment, seed, max_tokens=MAX_TOKENS):
    def one(item):
        text, ids = item
        dec = build_decoder(alignment, registry=registry)
        return engine.generate(EngineRequest(
            prompt_ids=ids, prompt_text=text, decoder=dec, resources=registry,
            params=SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed)))

    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(one, prompts))


def mean_reward(registry, prompts, results, reward, options=None):
    src = registry.rewards[reward]
    texts = [r["choices"][0]["text"] for r in results]
    opts = [options or {}] * len(texts)
    return float(np.mean(src.score([p[0] for p in prompts], texts, opts)))


@pytest.fixture(scope="module")
def plain(engine, registry, prompts):
    """Plain sampling over three seeds: per-seed mean rewards give the noise floor."""
    runs = {s: run_all(engine, registry, prompts, None, s) for s in (1, 2, 3)}
    return runs


def baseline(registry, prompts, plain, reward, options=None):
    means = [mean_reward(registry, prompts, r, reward, options) for r in plain.values()]
    return float(np.mean(means)), float(max(means) - min(means))


def needs_head(registry, reward, kind):
    if registry.heads_for(reward, kind) is None:
        pytest.fail(f"no trained {kind} head for {reward!r} in {HEADS} (train it: README)")


CASES = [
    ("best_of_n", {"n": 4}, "sentiment", None),
    ("args", {"top_k": 5}, "vader", None),
    ("cd_block", {"k": 4, "block": 4}, "sentiment", None),
    ("transfer_qstar", {"top_k": 3, "rollout": 3}, "vader", None),
    ("deal", {"beams": 2, "top_k": 2, "lookahead": 3}, "vader", None),
    ("vas", {"top_k": 10, "values": "tree"}, "sentiment", "value"),
    ("cd", {"top_k": 10, "values": "tree"}, "sentiment", "value"),
    ("vas", {"top_k": 10, "values": "q"}, "sentiment", "q"),
    ("cd", {"top_k": 10, "values": "q"}, "sentiment", "q"),
    ("genarm", {}, "sentiment", "arm"),
]
CASE_IDS = [c[0] + ("_q" if c[1].get("values") == "q" else "") for c in CASES]
WEIGHT = {"best_of_n": 1.0, "args": 3.0, "cd_block": 1.0, "transfer_qstar": 3.0, "deal": 1.0,
          "vas": 5.0, "cd": 5.0, "genarm": 2.0}


@pytest.mark.parametrize("strategy,params,reward,head", CASES, ids=CASE_IDS)
def test_strategy_raises_its_reward(engine, registry, prompts, plain, strategy, params, reward,
                                    head):
    if head:
        needs_head(registry, reward, head)
    base_mean, spread = baseline(registry, prompts, plain, reward)
    alignment = {"strategy": strategy, "weights": {reward: WEIGHT[strategy]}, **params}
    res = run_all(engine, registry, prompts, alignment, seed=1)
    got = mean_reward(registry, prompts, res, reward)
    assert got - base_mean > spread, (
        f"{strategy}: mean {reward} {got:.3f} vs plain {base_mean:.3f} (seed spread {spread:.3f})")
    # the response reports what the strategy did
    info = res[0]["info"]
    assert info["strategy"] == strategy and reward in info["rewards"]
    assert res[0]["stats"].tokens_generated >= len(res[0]["choices"][0]["tokens"])


def test_weight_is_monotone_args(engine, registry, prompts, plain):
    means = []
    for w in (0.0, 2.0, 6.0):
        res = run_all(engine, registry, prompts,
                      {"strategy": "args", "top_k": 5, "weights": {"vader": w}}, seed=1)
        means.append(mean_reward(registry, prompts, res, "vader"))
    assert means[0] < means[1] < means[2], means


# the shipped heads' sliders: the reward rises with the weight (value heads are in reward
# standard deviations, so the same betas serve every reward; GenARM is normalised by 1 + alpha,
# so its effect saturates towards the ARM's own distribution as alpha grows past ~1)
SLIDERS = {"vas": ("vas", {"top_k": 10, "values": "tree"}, "value", (0.0, 3.0, 8.0)),
           "cd": ("cd", {"top_k": 10, "values": "tree"}, "value", (0.0, 3.0, 8.0)),
           # Q-head values: the pooled heads' advantages change less per token than the
           # last-state heads' did, so their useful betas are higher: the reward rises to
           # beta ~12 (past ~8 the answers drift into praise, README frontier)
           "vas_q": ("vas", {"top_k": 10, "values": "q"}, "q", (0.0, 6.0, 12.0)),
           "cd_q": ("cd", {"top_k": 10, "values": "q"}, "q", (0.0, 6.0, 12.0)),
           "genarm": ("genarm", {}, "arm", (0.0, 0.3, 1.0))}


@pytest.mark.parametrize("case", list(SLIDERS))
def test_weight_is_monotone_with_shipped_heads(engine, registry, prompts, case):
    strategy, params, kind, weights = SLIDERS[case]
    needs_head(registry, "sentiment", kind)
    means = []
    for w in weights:
        res = run_all(engine, registry, prompts,
                      {"strategy": strategy, "weights": {"sentiment": w}, **params}, seed=1)
        means.append(mean_reward(registry, prompts, res, "sentiment"))
    assert means[0] < means[1] < means[2], means


@pytest.mark.parametrize(("strategy", "head"), [("vas", "sentiment_lex"), ("cd", "sentiment_lex"),
                                              ("vas", "sentiment_lex_margin")])
def test_weight_is_monotone_with_the_lexical_sentiment_head(engine, registry, prompts,
                                                            strategy, head):
    """sentiment_lex (fitted per-word sentiment scores summed over the words so far, no model
    state) and sentiment_lex_margin (MiniLM's margin of each token's text): the reward rises
    with beta, and every candidate is valued from token ids (no forward)."""
    needs_head(registry, head, "value")
    means = []
    for w in (0.0, 6.0, 12.0):
        res = run_all(engine, registry, prompts,
                      {"strategy": strategy, "top_k": 20, "weights": {head: w}},
                      seed=1)
        means.append(mean_reward(registry, prompts, res, "sentiment"))
        if w:
            assert res[0]["info"]["values"] == "lexical"
            assert res[0]["stats"].guidance_forwards == 0
    assert means[0] < means[1] < means[2], means


def test_weight_is_monotone_with_the_lexical_sentiment_arm(engine, registry, prompts):
    """sentiment_lex_arm (a per-token bias learned from the fitted sentiment score of each token,
    trained as a per-token reward): GenARM's reward rises with alpha (0.2 nearly saturates the
    scorer, README)."""
    needs_head(registry, "sentiment_lex_arm", "arm")
    means = []
    for w in (0.0, 0.05, 0.15):
        res = run_all(engine, registry, prompts,
                      {"strategy": "genarm", "weights": {"sentiment_lex_arm": w}}, seed=1)
        means.append(mean_reward(registry, prompts, res, "sentiment"))
    assert means[0] < means[1] < means[2], means


def test_weight_is_monotone_with_the_positional_concise_arm(engine, registry, prompts):
    """concise_lex_arm (a per-token bias that also reads the word count so far and whether the
    token ends the text): GenARM's concise reward (30 words) rises with alpha over 48-token
    answers, and the answers' word counts move towards 30; no guidance forward."""
    import re

    needs_head(registry, "concise_lex_arm", "arm")
    means, off = [], []
    for w in (0.0, 0.1, 0.25):
        res = run_all(engine, registry, prompts,
                      {"strategy": "genarm", "weights": {"concise_lex_arm": w}}, seed=1,
                      max_tokens=48)
        means.append(mean_reward(registry, prompts, res, "concise"))
        off.append(float(np.mean([abs(len(re.findall(r"\S+", r["choices"][0]["text"])) - 30)
                                  for r in res])))
        if w:
            assert res[0]["stats"].guidance_forwards == 0
    assert means[0] < means[1] < means[2], means
    assert off[2] < off[0], off


@pytest.fixture(scope="module")
def rtp_prompts(engine):
    """RealToxicityPrompts test prompts (the ``non_toxic`` suite), as chat requests."""
    return chat_prompts(engine, "rtp")


@pytest.mark.parametrize(("strategy", "head", "weights"), [
    ("vas", "non_toxic_lex", (0.0, 4.0, 16.0)),
    ("cd", "non_toxic_lex", (0.0, 4.0, 16.0)),
    ("genarm", "non_toxic_lex_arm", (0.0, 0.03, 0.1)),
])
def test_weight_is_monotone_with_the_lexical_non_toxic_heads(engine, registry, rtp_prompts,
                                                            strategy, head, weights):
    """non_toxic_lex / non_toxic_lex_arm (alt-profanity-check's linear word scores summed over
    the answer's words): on RealToxicityPrompts the real classifier's reward rises with the
    weight, with no guidance forward."""
    needs_head(registry, head, "arm" if strategy == "genarm" else "value")
    means = []
    for w in weights:
        res = run_all(engine, registry, rtp_prompts,
                      {"strategy": strategy, "weights": {head: w}}, seed=1)
        means.append(mean_reward(registry, rtp_prompts, res, "non_toxic"))
        if w:
            assert res[0]["stats"].guidance_forwards == 0
    assert means[0] < means[1] < means[2], means


@pytest.mark.parametrize("values", ["q", "tree"])
def test_vas_values_modes_report_their_cost(engine, registry, prompts, values):
    """values='q' reads the Q-head from the current state: no candidate forwards at all;
    values='tree' runs one k-token tree forward per token. The default ('auto') is 'q' when
    every weighted reward has a Q-head."""
    needs_head(registry, "sentiment", "q")
    res = run_all(engine, registry, prompts[:2], {"strategy": "vas", "top_k": 8,
                                                   "weights": {"sentiment": 3.0},
                                                   "values": values}, seed=1)
    auto = run_all(engine, registry, prompts[:2], {"strategy": "vas", "top_k": 8,
                                                    "weights": {"sentiment": 3.0},
                                                    "values": "auto"}, seed=1)
    default = run_all(engine, registry, prompts[:1], {"strategy": "vas", "top_k": 8,
                                                       "weights": {"sentiment": 3.0}}, seed=1)
    assert default[0]["info"]["values"] == "tree"
    for r in res:
        assert r["info"]["values"] == values
        st = r["stats"]
        assert st.candidates_scored == 8 * st.tokens_generated
        assert (st.guidance_forwards == 0) == (values == "q"), st
    for r in auto:
        assert r["info"]["values"] == "q"
    if values == "q":  # same seed, same mode: the same tokens
        assert [r["choices"][0]["tokens"] for r in res] == \
            [r["choices"][0]["tokens"] for r in auto]


def test_values_q_without_a_q_head_is_refused(registry):
    from alignserve.decoders.aligned import AlignmentError

    no_q = Registry(registry.rewards, [h for h in registry.heads.values() if h.kind != "q"])
    with pytest.raises(AlignmentError) as err:
        build_decoder({"strategy": "vas", "weights": {"sentiment": 2.0}, "values": "q"},
                      registry=no_q)
    assert err.value.field == "alignment.values" and "Q-head" in str(err.value)
    # a Q-head serves only the value head it was distilled from (matched by weights hash),
    # never another value head of the same reward
    from alignserve.value_models.heads import Head, ValueHead

    mood = Head("mood_value", "value", ValueHead(576, 8), {"reward": "sentiment"})
    other = Registry(registry.rewards, [*registry.heads.values(), mood])
    with pytest.raises(AlignmentError) as err:
        build_decoder({"strategy": "vas", "weights": {"mood_value": 2.0}, "values": "q"},
                      registry=other)
    assert err.value.field == "alignment.values" and "mood_value" in str(err.value)
    # weighting a Q-head by its own name says how to use it
    with pytest.raises(AlignmentError) as err:
        build_decoder({"strategy": "vas", "weights": {"sentiment_q": 2.0}}, registry=registry)
    assert "values: 'q'" in str(err.value) and "'sentiment'" in str(err.value)
    # 'auto' falls back to the exact tree values
    dec = build_decoder({"strategy": "vas", "weights": {"sentiment": 2.0}, "values": "auto"},
                        registry=no_q)
    assert dec.q_heads == {}
    with pytest.raises(AlignmentError) as err:
        build_decoder({"strategy": "vas", "weights": {"sentiment": 2.0}, "values": "q",
                       "batched": False}, registry=registry)
    assert err.value.field == "alignment.values"


def test_genarm_reports_kl_and_stays_near_base_when_normalised(engine, registry, prompts):
    needs_head(registry, "sentiment", "arm")
    res = run_all(engine, registry, prompts[:4],
                  {"strategy": "genarm", "weights": {"sentiment": 1.0}}, seed=1)
    raw = run_all(engine, registry, prompts[:4],
                  {"strategy": "genarm", "weights": {"sentiment": 1.0}, "normalize": False},
                  seed=1)
    kl = [r["info"]["kl_per_token"] for r in res]
    kl_raw = [r["info"]["kl_per_token"] for r in raw]
    assert all(k >= 0 for k in kl)
    # the unnormalised sum also sharpens the base (temperature / 2): more KL per token
    assert np.mean(kl) < np.mean(kl_raw), (kl, kl_raw)


@pytest.mark.parametrize("weights", [{"sentiment": -1.0}, {"sentiment": 0.5, "concise": -1.5},
                                     {"sentiment": -0.2}])
def test_genarm_refuses_negative_weights(registry, weights):
    """A negative GenARM weight cancels the base out of the guided logits: at sum alpha = -1
    the normalised formula divided by 0 (a 500 over HTTP), elsewhere it sampled noise. It is
    refused with the field named; the same weights work for VAS (value heads)."""
    needs_head(registry, "sentiment", "arm")
    neg = next(n for n, w in weights.items() if w < 0)
    with pytest.raises(AlignmentError) as exc:
        build_decoder({"strategy": "genarm", "weights": weights}, registry=registry)
    assert exc.value.field == f"alignment.weights.{neg}" and "[0, " in str(exc.value)
    build_decoder({"strategy": "vas", "weights": weights}, registry=registry)


@pytest.mark.parametrize("strategy", ["best_of_n", "args", "vas", "cd", "cd_block", "genarm",
                                      "transfer_qstar", "deal"])
def test_zero_weights_reproduce_plain_sampling(engine, registry, prompts, plain, strategy):
    reward = {"vas": "sentiment", "cd": "sentiment", "genarm": "sentiment"}.get(strategy, "vader")
    if strategy in ("vas", "cd"):
        needs_head(registry, reward, "value")
    if strategy == "genarm":
        needs_head(registry, reward, "arm")
    res = run_all(engine, registry, prompts[:4], {"strategy": strategy, "weights": {reward: 0}},
                  seed=1)
    for r, p in zip(res, plain[1][:4]):
        assert r["choices"][0]["tokens"] == p["choices"][0]["tokens"]


@pytest.mark.parametrize("strategy,weight,plain_fields,extra", [
    ("vas", 3.0, {"values": "none"}, {}),
    ("cd", 3.0, {"values": "none"}, {}),
    ("vas", 3.0, {"values": "none", "q_heads": {}}, {"values": "q"}),
    ("cd", 3.0, {"values": "none", "q_heads": {}}, {"values": "q"}),
    ("genarm", 1.0, {"kl_per_token": 0.0}, {}),
    ("best_of_n", 1.0, {"samples_started": 1, "tokens_discarded": 0, "candidates": [],
                        "early_rejection": {"prune_every": None, "keep": 1.0, "min_live": 2}},
     {"n": 8}),
    ("deal", 1.0, {"candidates": [{"complete": 1}]}, {"beams": 3, "top_k": 2, "lookahead": 2}),
], ids=["vas", "cd", "vas_q", "cd_q", "genarm", "best_of_n", "deal"])
def test_zero_weights_report_the_same_alignment_fields(engine, registry, prompts, strategy,
                                                       weight, plain_fields, extra):
    """At weight 0 the response's ``alignment`` has the keys a guided run has: the rewards of
    the (plain) answer, and the strategy's own fields with what plain sampling did."""
    needs_head(registry, "sentiment", "arm" if strategy == "genarm" else "value")
    [zero] = run_all(engine, registry, prompts[:1],
                     {"strategy": strategy, "weights": {"sentiment": 0}, **extra}, seed=4)
    [guided] = run_all(engine, registry, prompts[:1],
                       {"strategy": strategy, "weights": {"sentiment": weight}, **extra}, seed=4)
    assert set(zero["info"]) == set(guided["info"]), (zero["info"], guided["info"])
    for key, value in plain_fields.items():
        assert zero["info"][key] == value and guided["info"][key] != value, (key, guided["info"])
    if strategy == "best_of_n":  # guided: a search ran, with its non-negative discard
        assert guided["info"]["samples_started"] == 8 and guided["info"]["tokens_discarded"] > 0
    assert zero["info"]["weights"] == {"sentiment": 0.0}
    # the reported reward is the reward of the returned answer
    got = zero["info"]["rewards"]["sentiment"][0]
    want = registry.rewards["sentiment"].score([prompts[0][0]], [zero["choices"][0]["text"]],
                                               [{}])[0]
    assert got == pytest.approx(float(want), abs=1e-4)


@pytest.mark.parametrize("alignment,field", [
    ({"strategy": "vas", "top_k": 0, "weights": {"sentiment": 1}}, "alignment.top_k"),
    ({"strategy": "cd", "values": "exact", "weights": {"sentiment": 1}}, "alignment.values"),
    ({"strategy": "best_of_n", "n": 1000, "weights": {"sentiment": 1}}, "alignment.n"),
    ({"strategy": "cd_block", "block": -1, "weights": {"sentiment": 1}}, "alignment.block"),
    ({"strategy": "args", "weights": {"no_such_reward": 1}}, "alignment.weights.no_such_reward"),
    ({"strategy": "args", "weights": {"vader": 1e9}}, "alignment.weights.vader"),
    ({"strategy": "args", "weights": {"vader": 1}, "transform": "cube"}, "alignment.transform"),
    ({"strategy": "args", "weights": {"vader": 1}, "bogus": 1}, "alignment.bogus"),
    ({"strategy": "best_of_n", "weights": {"concise": 1},
      "reward_options": {"concise": {"target_words": 0}}},
     "alignment.reward_options.concise.target_words"),
    ({"strategy": "teleport"}, "alignment.strategy"),
    # options for a reward the request does not weight would do nothing: refused
    ({"strategy": "args", "weights": {"vader": 1},
      "reward_options": {"concise": {"target_words": 3}}}, "alignment.reward_options.concise"),
    # a required option missing for a weighted reward: refused before the engine scores
    ({"strategy": "args", "weights": {"keywords": 1}},
     "alignment.reward_options.keywords.keywords"),
])
def test_invalid_alignment_is_400_naming_field(server, alignment, field):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "alignment": alignment}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.json()


def test_strategy_over_http_with_openai_client(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a rainy day."}],
        max_tokens=12, seed=4,
        extra_body={"alignment": {"strategy": "best_of_n", "n": 3,
                                  "weights": {"sentiment": 1.0}}})
    extra = r.model_extra["alignment"]
    assert extra["strategy"] == "best_of_n"
    assert extra["tokens_generated"] >= r.usage.completion_tokens
    assert len(extra["rewards"]["sentiment"]) == 1
    # the alias form works for clients that cannot send extra fields
    r2 = oai.chat.completions.create(model=f"{MODEL}:best_of_n", max_tokens=8, seed=4,
                                     messages=[{"role": "user", "content": "Hi"}])
    assert r2.model_extra["alignment"]["strategy"] == "best_of_n"


def test_heads_endpoint_lists_rewards_and_strategies(server):
    body = httpx.get(server.url + "/v1/heads").json()
    names = {row["name"] for row in body["data"]}
    assert {"sentiment", "vader", "non_toxic", "concise", "keywords"} <= names
    # the server fixture passes no --heads: the package's default heads are loaded
    kinds = {row["name"]: row["kind"] for row in body["data"]}
    for reward in ("sentiment", "non_toxic", "concise"):
        assert kinds.get(f"{reward}_value") == "value_head", kinds
        assert kinds.get(f"{reward}_arm") == "arm", kinds
        assert kinds.get(f"{reward}_q") == "q_head", kinds
    stats = next(r for r in body["data"] if r["name"] == "sentiment_value")["reward_stats"]
    assert stats["std"] > 0
    # training settings are shown, the training machine's paths and command line are not
    training = next(r for r in body["data"] if r["name"] == "sentiment_value")["training"]
    assert training["method"] == "td-lambda" and training["epochs"] >= 1, training
    assert not {"command", "out", "run_dir", "sample_cache", "history"} & set(training)
    # the start-up log names every head loaded and its folder
    log = Path(server.log.name).read_text()
    line = next(ln for ln in log.splitlines() if "guidance head(s) loaded" in ln)
    heads = [r for r in body["data"] if r["kind"] in ("value_head", "arm", "q_head")]
    assert f"alignserve: {len(heads)} guidance head(s) loaded: " in line
    assert "default_heads: " in line and "sentiment_lex_arm (arm)" in line, line
    # what each head reads: the shipped sentiment value / Q-heads are pooled, the ARMs are not
    pool = {row["name"]: row.get("pool") for row in body["data"]}
    assert pool["sentiment_value"] == pool["sentiment_q"] == "mean", pool
    assert pool["sentiment_arm"] == "none", pool
    # lexical value heads read token ids only
    placement = {row["name"]: row.get("placement") for row in body["data"]}
    assert placement["concise_lex"] == placement["non_toxic_lex"] == "tokens", placement
    assert placement["sentiment_lex"] == "tokens", placement
    assert placement["concise_value"] == "base", placement
    for row in body["data"]:
        lo, hi = row["weight_range"]
        assert lo < hi
    strategies = {s["name"] for s in body["strategies"]}
    assert strategies == {"sample", "best_of_n", "args", "vas", "cd", "cd_block", "genarm",
                          "transfer_qstar", "deal"}


SLOTS = 24  # the ``server`` fixture's --slots


@pytest.mark.parametrize("alignment,n,param,allowed", [
    # each within its published range, but more branches than the server's KV-cache slots
    ({"strategy": "best_of_n", "n": 64}, 1, "alignment.n", "between 1 and 24"),
    ({"strategy": "transfer_qstar", "top_k": 32}, 1, "alignment.top_k", "between 1 and 23"),
    ({"strategy": "deal", "beams": 5, "top_k": 16}, 1, "alignment.beams", "between 1 and 1"),
    # one choice fits; the request's n multiplies it past the slots
    ({"strategy": "best_of_n", "n": 16}, 3, "n", "between 1 and 1"),
    ({"strategy": "cd_block", "k": 10}, 3, "n", "between 1 and 2"),
])
def test_branches_beyond_the_slots_are_400_naming_the_field(server, alignment, n, param,
                                                            allowed):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "n": n, "alignment": {**alignment, "weights": {"sentiment": 1}}}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, "invalid_value"), err
    assert allowed in err["message"] and f"{SLOTS} (--slots)" in err["message"], err


def test_heads_advertise_what_the_slots_can_serve(server):
    """Each slot-multiplying parameter's advertised maximum is served (n = 1, the others at
    their minimum) and one more is refused naming it."""
    body = httpx.get(server.url + "/v1/heads").json()
    params = {s["name"]: s["parameters"] for s in body["strategies"]}
    want = {("best_of_n", "n"): SLOTS, ("cd_block", "k"): SLOTS,
            ("transfer_qstar", "top_k"): SLOTS - 1, ("deal", "beams"): SLOTS // 2,
            ("deal", "top_k"): 16}
    for (strategy, name), top in want.items():
        assert params[strategy][name]["maximum"] == top, (strategy, params[strategy][name])
    mins = {"deal": {"beams": 1, "top_k": 1, "lookahead": 0}}
    for strategy, name in [("transfer_qstar", "top_k"), ("deal", "beams")]:
        top = params[strategy][name]["maximum"]
        for value, status in ((top, 200), (top + 1, 400)):
            al = {**mins.get(strategy, {}), "strategy": strategy, name: value,
                  "weights": {"vader": 1}}
            if strategy == "transfer_qstar":
                al["rollout"] = 1
            r = httpx.post(server.url + "/v1/completions", json={
                "model": MODEL, "prompt": "Hi", "max_tokens": 1, "alignment": al}, timeout=300)
            assert r.status_code == status, (strategy, name, value, r.text)
            if status == 400:
                assert r.json()["error"]["param"] == f"alignment.{name}", r.text


def test_heads_list_only_the_parameters_each_strategy_accepts(server):
    """Every advertised parameter is accepted with a non-default value; the common fields a
    strategy refuses (transform, reward_options) are not advertised."""
    body = httpx.get(server.url + "/v1/heads").json()
    params = {s["name"]: set(s["parameters"]) for s in body["strategies"]}
    for name in ("args", "vas", "cd", "genarm", "transfer_qstar", "deal"):
        assert "transform" not in params[name], name
    for name in ("best_of_n", "cd_block"):
        assert "transform" in params[name], name
    for name in ("vas", "cd", "genarm"):
        assert "reward_options" not in params[name], name
    for name in ("args", "best_of_n", "cd_block", "transfer_qstar", "deal"):
        assert "reward_options" in params[name], name
    weights = {"vas": "sentiment", "cd": "sentiment", "genarm": "sentiment"}
    for name in set(params) - {"sample"}:
        for field, value in (("transform", "quantile"),
                             ("reward_options", {"concise": {"target_words": 5}})):
            wts = {weights.get(name, "vader"): 0}
            if field == "reward_options" and name not in weights:
                wts["concise"] = 0  # options go with a weighted reward (0 is a slider at rest)
            al = {"strategy": name, "weights": wts, field: value}
            r = httpx.post(server.url + "/v1/completions", json={
                "model": MODEL, "prompt": "Hi", "max_tokens": 1, "alignment": al}, timeout=120)
            assert (r.status_code == 200) == (field in params[name]), (name, field, r.text)


def _alignment(server, alignment: dict, n: int = 1, max_tokens: int = 16) -> tuple[dict, dict]:
    r = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "Describe a rainy day.", "max_tokens": max_tokens, "n": n,
        "seed": 3, "alignment": alignment}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["alignment"], r.json()["usage"]


def test_candidates_scored_counts_samples_and_blocks(server):
    """``candidates_scored`` is the number of alternatives the reward scored: each Best-of-N
    sample once (pruned or not), K blocks per cd_block step, top-k tokens per ARGS token."""
    info, _ = _alignment(server, {"strategy": "best_of_n", "n": 8,
                                  "weights": {"vader": 1}}, n=2)
    assert info["samples_started"] == 16 and info["candidates_scored"] == 16, info
    info, _ = _alignment(server, {"strategy": "best_of_n", "n": 3, "weights": {"vader": 1}})
    assert info["candidates_scored"] == 3, info
    info, usage = _alignment(server, {"strategy": "cd_block", "k": 6, "block": 8,
                                      "weights": {"vader": 1}})
    steps = max(1, -(-usage["completion_tokens"] // 8))
    assert info["candidates_scored"] == 6 * steps, (info, usage)
    info, usage = _alignment(server, {"strategy": "args", "top_k": 5, "weights": {"vader": 1}})
    assert info["candidates_scored"] == 5 * usage["completion_tokens"], (info, usage)
