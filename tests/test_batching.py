"""One scheduler step batches everything across requests: sampling (one fused sampler call),
reward scoring (one call per reward source) and head evaluation (one call per head module).
Batching must change no output, and a failing reward source or a cancelled request must fail
alone while the step goes on."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from pathlib import Path

import pytest

from alignserve.decoders import build_decoder
from alignserve.engine import scheduler as sched
from alignserve.engine.sampling import SamplingParams
from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest
from alignserve.value_models.base import RewardInfo
from alignserve.value_models.heads import tokenizer_fingerprint
from alignserve.value_models.registry import Registry

PROMPT = "Describe a kitchen table in one sentence."
# the request under test, and 7 neighbours with other strategies and sampling parameters
PROBE = ({"strategy": "args", "top_k": 4, "weights": {"sentiment": 1}},
         dict(temperature=0.8, max_tokens=10, seed=7, presence_penalty=0.5))
NEIGHBOURS = [
    (None, dict(temperature=1.0, max_tokens=12, seed=1)),
    (None, dict(temperature=0.0, max_tokens=8, seed=2, logit_bias={1000: 3.0})),
    ({"strategy": "best_of_n", "n": 3, "weights": {"sentiment": 1}},
     dict(temperature=0.9, max_tokens=10, seed=3)),
    ({"strategy": "vas", "top_k": 5, "weights": {"sentiment": 2}},
     dict(temperature=0.7, max_tokens=10, seed=4, top_p=0.9)),
    ({"strategy": "genarm", "weights": {"sentiment": 1}},
     dict(temperature=1.0, max_tokens=10, seed=5, top_k=20)),
    ({"strategy": "cd_block", "k": 2, "block": 3, "weights": {"vader": 1}},
     dict(temperature=1.0, max_tokens=9, seed=6, frequency_penalty=1.0)),
    ({"strategy": "transfer_qstar", "top_k": 2, "rollout": 2, "weights": {"vader": 1}},
     dict(temperature=0.5, max_tokens=6, seed=8)),
]


class Broken:
    """A reward source that always fails (a crashed classifier service, say)."""

    info = RewardInfo("broken", "reward", "always raises", (0.0, 1.0))

    def score(self, prompts, responses, options=None):
        raise RuntimeError("reward service down")


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    eng = Engine(EngineConfig(model_dir=model_dir, slots=48, max_len=512, max_waiting=64))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def registry(engine):
    reg = Registry.build(None, tokenizer_fingerprint(engine.tokenizer),
                         engine.base.config.hidden_size, default_heads=True)
    reg.rewards["broken"] = Broken()
    return reg


def request(engine, registry, alignment, params: dict) -> EngineRequest:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                   add_generation_prompt=True, tokenize=False)
    return EngineRequest(prompt_ids=tok(text, add_special_tokens=False).input_ids,
                         prompt_text=text, params=SamplingParams(**params),
                         decoder=build_decoder(alignment, registry=registry),
                         resources=registry)


def run_together(engine, registry, specs) -> list:
    """Submit all at once (so they share steps); each result or the exception it ended with."""
    reqs = [request(engine, registry, a, p) for a, p in specs]

    def wait(r):
        try:
            return engine.generate(r, timeout=600)
        except Exception as exc:  # noqa: BLE001
            return exc

    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        return list(ex.map(wait, reqs))


def test_sampling_and_scoring_are_batched_across_requests(engine, registry, monkeypatch):
    calls: list[int] = []
    sources: list[tuple[str, int]] = []
    real_sample, real_scores = sched.sample_batch, sched.run_scores

    def counting_sample(ops):
        calls.append(len(ops))
        return real_sample(ops)

    def counting_scores(ops):
        sources.append((ops[0].source, len(ops)))
        return real_scores(ops)

    monkeypatch.setattr(sched, "sample_batch", counting_sample)
    monkeypatch.setattr(sched, "run_scores", counting_scores)
    res = run_together(engine, registry, [PROBE] * 4 + NEIGHBOURS[:3])
    assert all(isinstance(r, dict) for r in res), res
    assert max(calls) >= 4, calls  # one fused call served several requests' rows
    assert max(n for s, n in sources if s == "sentiment") >= 2, sources


def test_batching_changes_no_output(engine, registry):
    alone = engine.generate(request(engine, registry, *PROBE), timeout=600)
    together = run_together(engine, registry, [PROBE] + NEIGHBOURS)
    assert all(isinstance(r, dict) for r in together), together
    assert together[0]["choices"][0]["tokens"] == alone["choices"][0]["tokens"]
    # and a neighbour of another strategy is also unchanged by its company
    vas_alone = engine.generate(request(engine, registry, *NEIGHBOURS[3]), timeout=600)
    assert together[4]["choices"][0]["tokens"] == vas_alone["choices"][0]["tokens"]


def test_failing_reward_source_fails_alone(engine, registry):
    broken = ({"strategy": "args", "top_k": 3, "weights": {"broken": 1}},
              dict(temperature=1.0, max_tokens=6, seed=9))
    res = run_together(engine, registry, [broken, PROBE, NEIGHBOURS[2], broken])
    assert isinstance(res[0], RuntimeError) and "reward service down" in str(res[0])
    assert isinstance(res[3], RuntimeError)
    assert isinstance(res[1], dict) and isinstance(res[2], dict)
    alone = engine.generate(request(engine, registry, *PROBE), timeout=600)
    assert res[1]["choices"][0]["tokens"] == alone["choices"][0]["tokens"]


def test_cancelled_request_fails_alone(engine, registry):
    long = ({"strategy": "vas", "top_k": 4, "weights": {"sentiment": 1}},
            dict(temperature=1.0, max_tokens=200, seed=11, ignore_eos=True))
    victim = request(engine, registry, *long)
    started, ended = threading.Event(), []

    def cb(ev):
        if ev[0] == "delta":
            started.set()
        elif ev[0] in ("done", "error"):
            ended.append(ev)

    victim.callback = cb
    engine.submit(victim)
    with cf.ThreadPoolExecutor(2) as ex:
        others = ex.map(
            lambda spec: engine.generate(request(engine, registry, *spec), timeout=600),
            [PROBE, NEIGHBOURS[0]])
        assert started.wait(120), "the long request never produced a token"
        engine.cancel(victim)
        done = list(others)
    assert all(r["choices"][0]["finish_reason"] in ("stop", "length") for r in done)
    assert len(ended) == 1 and ended[0][0] == "error" and "cancelled" in str(ended[0][1])
    assert victim.done


def test_heads_are_batched_across_requests_and_change_no_output(engine, registry, monkeypatch):
    """VAS value heads and GenARM ARMs of concurrent requests run as one call per head module
    per step, and a seeded request gives the same tokens alone and in company."""
    vas = [({"strategy": "vas", "top_k": 5, "weights": {"sentiment": 2}},
            dict(temperature=0.7, max_tokens=8, seed=s, top_p=0.9)) for s in (21, 22, 23)]
    arm = [({"strategy": "genarm", "weights": {"sentiment": 1}},
            dict(temperature=1.0, max_tokens=8, seed=s, top_k=20)) for s in (31, 32, 33)]
    value_mod = registry.heads_for("sentiment", "value").module
    arm_mod = registry.heads_for("sentiment", "arm").module
    calls: dict[str, list[tuple[int, int]]] = {"value": [], "arm": []}

    def counting(kind, fn):
        def wrapper(h, *rest):
            calls[kind].append((engine.step_count, int(h.shape[0])))
            return fn(h, *rest)
        return wrapper

    monkeypatch.setattr(value_mod, "forward", counting("value", value_mod.forward))
    monkeypatch.setattr(arm_mod, "logprobs", counting("arm", arm_mod.logprobs))
    together = run_together(engine, registry, vas + arm + [NEIGHBOURS[0], PROBE])
    assert all(isinstance(r, dict) for r in together), together
    for kind, rows_per_request in (("value", 5), ("arm", 1)):
        steps = [s for s, _ in calls[kind]]
        assert len(steps) == len(set(steps)), (kind, calls[kind])  # one call per step
        # several requests' rows went through one call
        assert max(r for _, r in calls[kind]) >= 2 * rows_per_request, (kind, calls[kind])
    monkeypatch.undo()
    for spec, res in ((vas[1], together[1]), (arm[2], together[5])):
        alone = engine.generate(request(engine, registry, *spec), timeout=600)
        assert res["choices"][0]["tokens"] == alone["choices"][0]["tokens"], spec
