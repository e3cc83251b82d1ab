"""Evaluation harness: run strategies on the held-out test prompts and compute figures of merit.

One run = a list of *settings* (strategy + parameters, e.g. ``best_of_n n=4``) evaluated on the
same prompts and seeds. Plain sampling always runs first: it is the reference for the win rate
and the KL estimate. ``alignserve eval`` generates every response at temperature 1 with no
top-k/top-p, so the base distribution the KL refers to is the model itself (the backends take a
``temperature`` for other drivers, e.g. ``bench/frontier.py``).

Where the responses come from (``Backend``):

* ``InProcessBackend`` (default): the engine in this process, requests submitted from
  ``concurrency`` threads so the scheduler batches them like a loaded server would.
* ``HttpBackend``: a live ``alignserve serve`` through the official ``openai`` client,
  ``extra_body={"alignment": ...}``, ``logprobs=true`` for the base log-probabilities.

What is measured, per setting (see docs/methods.md, "Figures of merit"):

* **Reward** per objective, scored here on the returned text with the registry's reward
  sources (for an objective that names a guidance head: the reward that head approximates,
  ``head.manifest["reward"]``). Objectives are scored against the *user's* prompt text (not the
  chat-templated string), so the in-process and HTTP backends score identically. The headline
  ``reward`` is ``sum_i w_i r_i / sum_i |w_i|`` (the objective itself when there is one). The
  95% interval is over prompts (seeds are averaged per prompt first), because responses to the
  same prompt are not independent.
* **Win rate** vs plain sampling, paired on (prompt, seed), ties counted 1/2 — so sampling vs
  itself is exactly 0.5.
* **KL.** Over HTTP only the *base* log-probability of each returned token is available, so
  the cross-entropy proxy below is reported; in-process the policy's own log-probability is
  recorded too and the Monte-Carlo estimate is used. All figures:

  - ``kl_proxy`` — a *cross-entropy proxy*, not a KL:
    KL(pi || p) = CE(pi, p) - H(pi) ~= CE(pi, p) - H(p). Per response,
    ``T * (nll_pi - nll_p)``, where ``nll_pi`` is the base model's mean per-token NLL of the
    strategy's tokens, ``nll_p`` the base's mean per-token NLL of plain samples for the same
    prompt (pooled over seeds) and T the response length; averaged over responses. It is exactly
    0 for plain sampling, grows when guidance moves to tokens the base finds unlikely, and can
    go *negative* for strategies that sharpen the distribution (greedy-like ARGS, DeAL): there
    H(pi) < H(p) and the proxy under-states the KL.
  - ``kl_bound`` — the analytic value where one exists: Best-of-N ``log N - (N-1)/N`` (exact
    without reward ties) and blockwise CD ``(log K - (K-1)/K) * blocks`` (an upper bound).
  - ``kl_mc`` — for token-wise strategies run in-process, the Monte-Carlo estimate
    ``mean_responses sum_t log pi(y_t) - log p(y_t)`` from the policy log-probability the engine
    records for every emitted token (``TokenInfo.policy_logprob``).
  - ``kl`` — what the frontier plot uses: ``kl_bound`` where it exists, else ``kl_mc``, else
    ``kl_proxy``; ``kl_source`` says which (``exact``: Best-of-N, ``bound``: cd_block, ``mc``,
    ``ce-proxy``).

* **Diversity**: ``metrics.diversity`` (within response, n=2..4) and ``distinct_n`` for n=1,2
  pooled over all responses of the setting (mode collapse across prompts/seeds).
* **Coherence**: MiniLM cosine between prompt and response (``rewards.minilm_embed``).
* **Cost**: returned tokens per second of the setting's whole batch (aggregate throughput at
  the given concurrency), wall seconds per response (client side, queueing included), and per
  returned token: tokens the strategy generated (discarded branches included) and guidance
  forwards (value-head tree forwards, reward calls), from the engine's ``Stats``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .metrics import (
    bon_kl_bound,
    coherence,
    distinct_n,
    diversity,
    mean_ci95,
    win_rate,
)

log = logging.getLogger("alignserve.eval")

BON_CURVE: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
"""N of the Best-of-N reference curve (``--bon-curve``)."""

HEAD_KIND: dict[str, str] = {"vas": "value", "cd": "value", "genarm": "arm"}
"""Strategies whose weights name guidance heads (of this kind) rather than reward sources."""


# ---- specs ----------------------------------------------------------------------------------
def parse_weights(spec: str) -> dict[str, float]:
    """``"a"`` / ``"a=2"`` / ``"a,b=0.5"`` -> ``{"a": 1.0, "b": 0.5}`` (missing weight = 1).

    The same syntax as ``train --reward`` and head manifests' ``reward`` field, so a head's
    objective can be parsed with it.
    """
    out: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"empty objective name in {spec!r}")
        try:
            out[name] = float(w) if w.strip() else 1.0
        except ValueError:
            raise ValueError(f"weight of {name!r} in {spec!r} is not a number") from None
    if not out:
        raise ValueError(f"no objective in {spec!r}")
    return out


def _value(text: str) -> Any:
    """Parse a sweep value: int, float, bool, or the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


PSEUDO_PARAMS = ("weight", "head")
"""Sweep parameters the harness consumes itself (``build_settings``), never a strategy's."""


def strategy_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep point's parameters without the harness's own ``PSEUDO_PARAMS``: what the
    strategy's options receive."""
    return {k: v for k, v in params.items() if k not in PSEUDO_PARAMS}


def parse_sweep(spec: str) -> tuple[str, str, list[Any]]:
    """``"vas.top_k=10,20"`` -> ``("vas", "top_k", [10, 20])``.

    ``weight`` is a pseudo-parameter: it scales the objective weights of that strategy's
    ``alignment.weights`` (``vas.weight=1,3,5`` sweeps beta).
    """
    key, sep, vals = spec.partition("=")
    strategy, dot, param = key.strip().partition(".")
    if not sep or not dot or not strategy or not param:
        raise ValueError(f"sweep {spec!r} is not STRATEGY.PARAM=v1,v2,...")
    values = [_value(v) for v in vals.split(",") if v.strip()]
    if not values:
        raise ValueError(f"sweep {spec!r} has no values")
    if len(set(map(repr, values))) != len(values):
        raise ValueError(f"sweep {spec!r} repeats a value")
    return strategy, param, values


@dataclass
class Objective:
    """One objective of the run: what strategies steer toward and how the text is scored.

    ``name`` is what the user wrote (a reward source, or a guidance head's name); ``weight`` its
    relative weight; ``score`` the reward sources (with weights) the returned text is scored
    with — ``{name: 1}`` for a source, the head's manifest reward for a head.
    """

    name: str
    weight: float
    score: dict[str, float]


def resolve_objectives(spec: str, registry: Any) -> list[Objective]:
    """Turn ``--objective`` into scored objectives; unknown names fail with what is loaded."""
    out = []
    for name, w in parse_weights(spec).items():
        if name in registry.rewards:
            out.append(Objective(name, w, {name: 1.0}))
            continue
        head = registry.heads.get(name)
        if head is None:
            known = sorted(registry.rewards) + sorted(registry.heads)
            raise ValueError(f"unknown objective {name!r}; available: {known}")
        score = head.manifest.get("reward_weights") or parse_weights(
            str(head.manifest.get("reward", "")) or name)
        missing = [r for r in score if r not in registry.rewards]
        if missing:
            raise ValueError(f"head {name!r} approximates {missing}, which are not loaded here")
        out.append(Objective(name, w, {k: float(v) for k, v in score.items()}))
    return out


def strategy_weights(strategy: str, objectives: Sequence[Objective], registry: Any,
                     scale: float = 1.0) -> dict[str, float] | None:
    """``alignment.weights`` for ``strategy``, or None when a needed head is not loaded.

    VAS/CD name a value head per objective and GenARM an ARM (found by the objective's name or
    the reward it stands for); every other strategy takes the reward sources themselves.
    """
    kind = HEAD_KIND.get(strategy)
    weights: dict[str, float] = {}
    for ob in objectives:
        if kind is not None:
            keys = [ob.name] + [r for r in ob.score if r != ob.name]
            key = next((k for k in keys if registry.heads_for(k, kind) is not None), None)
            if key is None:
                return None
            weights[key] = weights.get(key, 0.0) + scale * ob.weight
        else:
            for r, w in ob.score.items():
                weights[r] = weights.get(r, 0.0) + scale * ob.weight * w
    return weights


@dataclass
class Setting:
    """One point of the evaluation grid: a strategy with fixed parameters."""

    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    alignment: dict[str, Any] | None = None
    reference: bool = False  # a point of the Best-of-N reference curve (only n varies)

    @property
    def label(self) -> str:
        if not self.params:
            return "base" if self.strategy == "sample" else "default"
        return " ".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def key(self) -> str:
        return f"{self.strategy} {self.label}"


def _pick_heads(strategy: str, spec: str, weights: dict[str, float],
                objectives: Sequence[Objective], registry: Any) -> dict[str, float]:
    """The weights of a ``head`` sweep point: ``"a"`` weights head (or reward) ``a`` instead of
    the objective's default; ``"a+b"`` weights each of them by the objective's weight divided by
    their number, the mean of their values (an ensemble of two estimates of the same reward,
    e.g. ``non_toxic+non_toxic_lex``: the Q-head or state value head plus the lexical one).
    ValueError if there is more than one objective or a head approximates another reward."""
    if len(objectives) != 1:
        raise ValueError(f"{strategy}.head picks heads for one objective only")
    ob = objectives[0]
    names = [n.strip() for n in spec.split("+")]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"{strategy}.head={spec!r}: name one head, or distinct heads joined "
                         f"by '+'")
    for head in names:
        h = registry.heads.get(head)
        reward = h.manifest.get("reward") if h is not None else head
        if (h is not None or head in registry.rewards) and reward not in {ob.name, *ob.score}:
            raise ValueError(f"{strategy}.head={head} approximates {reward!r}, not the "
                             f"objective {ob.name!r}")
    w = next(iter(weights.values())) / len(names)
    return {head: w for head in names}


def build_settings(strategies: Sequence[str], sweeps: Sequence[str],
                   objectives: Sequence[Objective], registry: Any, bon_curve: bool = False,
                   reward_options: Mapping[str, Any] | None = None,
                   warn: Callable[[str], None] = log.warning) -> list[Setting]:
    """Expand strategies x sweeps into settings; plain sampling first, always present.

    Sweeps over the same strategy form a Cartesian grid; ``weight`` scales the objective's
    weight and ``head`` (VAS / CD / GenARM) names the head to weight instead of the objective's
    default one (``vas.head=non_toxic_lex``), or several joined by ``+`` for the mean of their
    values (``_pick_heads``). A strategy whose head is not loaded is
    skipped through ``warn``. Parameters are validated by building each decoder here, so a bad
    sweep fails before any generation.
    """
    from ..decoders import STRATEGIES, AlignmentError, build_decoder

    scored = {r for o in objectives for r in o.score}
    for r in reward_options or {}:  # options nothing would read: a typo, or another reward
        if r not in scored:
            raise AlignmentError("reward_options", f"--reward-options names {r!r}, which the "
                                 f"objectives do not score (they score {sorted(scored)})")
    grids: dict[str, dict[str, list[Any]]] = {}
    for spec in sweeps:
        s, p, vals = parse_sweep(spec)
        grids.setdefault(s, {})[p] = vals
    order = list(dict.fromkeys(["sample", *strategies, *grids]))
    if bon_curve and "best_of_n" not in order:
        order.append("best_of_n")
    out: list[Setting] = []
    for name in order:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; available: {sorted(STRATEGIES)}")
        if name == "sample":
            out.append(Setting("sample"))
            continue
        grid = grids.get(name, {})
        combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
        if name == "best_of_n" and bon_curve:  # the reference curve, without duplicates
            if combos == [{}]:
                combos = []
            combos += [{"n": n} for n in BON_CURVE if {"n": n} not in combos]
        combos = combos or [{}]
        for params in combos:
            scale = float(params.get("weight", 1.0))
            weights = strategy_weights(name, objectives, registry, scale)
            if "head" in params and weights is not None:  # e.g. vas.head=non_toxic_lex
                weights = _pick_heads(name, str(params["head"]), weights, objectives, registry)
            if weights is None:
                kind = HEAD_KIND[name]
                warn(f"skipping {name}: no {kind} head loaded for "
                     f"{[o.name for o in objectives]} (train one, or pass --heads)")
                break
            alignment = {"strategy": name, "weights": weights,
                         **strategy_params(params)}
            used = {r: o for r, o in (reward_options or {}).items() if r in weights}
            if used and HEAD_KIND.get(name) is None:  # heads fixed them at training
                # (options of a reward only the scorer reads stay with the scorer: a request
                # is refused options for a reward it does not weight)
                alignment["reward_options"] = used
            build_decoder(alignment, registry=registry)  # validates; raises AlignmentError
            ref = name == "best_of_n" and set(params) == {"n"}
            if ref:  # the reference curve is plain Best-of-N (n >= 8 prunes by default)
                alignment["keep"] = 1.0
            out.append(Setting(name, dict(params), alignment, reference=ref))
    return out


# ---- generation backends --------------------------------------------------------------------
@dataclass
class Job:
    """One response to produce: a prompt (by index) and a seed."""

    prompt_index: int
    prompt: str
    seed: int


@dataclass
class Response:
    """What the harness needs from one generated response."""

    text: str
    base_logprobs: list[float]
    tokens_generated: int
    guidance_forwards: int
    wall_s: float
    error: str | None = None
    policy_logprobs: list[float] | None = None  # in-process only: the sampling distribution's
    tokens: list[int] | None = None  # in-process only: the returned token ids

    @property
    def n_tokens(self) -> int:
        return len(self.base_logprobs)


class Backend(Protocol):
    registry: Any
    device: str

    def generate(self, jobs: Sequence[Job], alignment: dict[str, Any] | None, max_tokens: int,
                 concurrency: int, on_done: Callable[[], None],
                 temperature: float = 1.0) -> list[Response]: ...

    def close(self) -> None: ...


def _run_pool(fn: Callable[[Job], Response], jobs: Sequence[Job], concurrency: int,
              on_done: Callable[[], None]) -> list[Response]:
    """Run ``fn`` over jobs from ``concurrency`` threads, keeping job order in the result."""
    lock = threading.Lock()

    def wrapped(job: Job) -> Response:
        t0 = time.perf_counter()
        try:
            r = fn(job)
        except Exception as exc:  # noqa: BLE001 - one failed response must not sink the run
            r = Response("", [], 0, 0, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
        with lock:
            on_done()
        return r

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(wrapped, jobs))


class InProcessBackend:
    """The engine in this process (what ``alignserve serve`` runs), fed from threads.
    ``no_repeat_ngram_size`` (attribute, default 0 = off) goes into every request."""

    no_repeat_ngram_size: int = 0

    def __init__(self, model: str | None = None, heads: Path | None = None, slots: int = 64,
                 max_len: int = 1024, threads: int | None = None, device: str = "cpu",
                 dtype: str = "float32") -> None:
        from ..engine.model_store import resolve_model
        from ..engine.scheduler import Engine, EngineConfig
        from ..value_models.heads import tokenizer_fingerprint
        from ..value_models.registry import Registry
        from ..value_models.rewards import HFNextTokenScorer

        model_dir = resolve_model(None if model in (None, "default") else model, progress=False)
        self.engine = Engine(EngineConfig(model_dir=model_dir, slots=slots, max_len=max_len,
                                          max_waiting=100_000, request_timeout_s=3600.0,
                                          device=device, dtype=dtype, threads=threads))
        self.registry = Registry.build(heads, tokenizer_fingerprint(self.engine.tokenizer),
                                       self.engine.base.config.hidden_size,
                                       judge_scorer=HFNextTokenScorer(model_dir))
        from ..server.main import attach_backbones

        attach_backbones(self.engine, self.registry)  # backbone-placed heads need their model
        self.tok = self.engine.tokenizer
        self.device = f"in-process engine ({device}, {dtype}, {slots} slots)"

    def prompt_ids(self, prompt: str) -> tuple[list[int], str]:
        """Chat-templated prompt, exactly as the server's /v1/chat/completions builds it."""
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=False)
        return list(self.tok(text, add_special_tokens=False).input_ids), text

    def generate(self, jobs: Sequence[Job], alignment: dict[str, Any] | None, max_tokens: int,
                 concurrency: int, on_done: Callable[[], None],
                 temperature: float = 1.0) -> list[Response]:
        from ..decoders import build_decoder
        from ..engine.sampling import SamplingParams
        from ..engine.scheduler import EngineRequest

        def one(job: Job) -> Response:
            ids, text = self.prompt_ids(job.prompt)
            dec = build_decoder(alignment, registry=self.registry)
            t0 = time.perf_counter()
            res = self.engine.generate(EngineRequest(
                prompt_ids=ids, prompt_text=text, decoder=dec, resources=self.registry,
                params=SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                      seed=job.seed,
                                      no_repeat_ngram_size=self.no_repeat_ngram_size)))
            wall = time.perf_counter() - t0
            ch = res["choices"][0]
            lps = [float(i.logprob) if i.logprob is not None else math.nan for i in ch["infos"]]
            plps = [float(i.policy_logprob) if i.policy_logprob is not None else math.nan
                    for i in ch["infos"]]
            st = res["stats"]
            return Response(ch["text"], lps, int(st.tokens_generated),
                            int(st.guidance_forwards), wall, policy_logprobs=plps,
                            tokens=[int(t) for t in ch["tokens"]])

        return _run_pool(one, jobs, concurrency, on_done)

    def positions_processed(self) -> int:
        """Token positions every model of the engine has run through its transformer so far
        (prompt prefill, decode steps, tree candidates, rollouts, backbones; padding excluded).

        Read it before and after a batch that runs alone to get that batch's compute."""
        return sum(r.tokens_processed for r in self.engine.runners.values())

    def tempered_logprobs(self, jobs: Sequence[Job], answers: Sequence[Sequence[int]],
                          temperature: float, concurrency: int = 8,
                          on_done: Callable[[], None] = lambda: None) -> list[list[float]]:
        """log p_T(y_t | x, y_<t) of each answer token under the base model at ``temperature``.

        One teacher-forced forward of prompt + answer per job (batched by the engine):
        ``log_softmax(logits / T)`` at the answer's positions. This is the distribution plain
        sampling at that temperature draws from, so ``policy_logprob - this`` summed over an
        answer is the Monte-Carlo KL of a token-wise strategy from plain sampling at the same
        temperature (for plain sampling itself it is 0 up to float rounding).

        Returns one list of floats per job (empty for an empty answer).

        Raises:
            ValueError: if ``temperature`` is not > 0 (greedy decoding has no log-density).
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        from ..engine.sampling import SamplingParams
        from ..engine.scheduler import EngineRequest

        lock = threading.Lock()

        def one(item: tuple[Job, Sequence[int]]) -> list[float]:
            job, answer = item
            dec = _TeacherForced(list(answer), temperature)
            if answer:
                ids, text = self.prompt_ids(job.prompt)
                self.engine.generate(EngineRequest(
                    prompt_ids=ids, prompt_text=text, decoder=dec,  # type: ignore[arg-type]
                    params=SamplingParams(max_tokens=0, seed=0)))
            with lock:
                on_done()
            return dec.logprobs

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, zip(jobs, answers, strict=True)))

    def close(self) -> None:
        self.engine.shutdown()


class _TeacherForced:
    """An engine request that samples nothing: it runs prompt + given answer through the base
    model in one forward and keeps ``log_softmax(logits / T)`` of each answer token.

    Duck-types the engine's decoder interface (``name``, ``slots_needed``, ``run``), so the
    forwards batch with whatever else the engine is running."""

    name = "teacher_forced"

    def __init__(self, answer: list[int], temperature: float) -> None:
        self.answer = answer
        self.temperature = temperature
        self.logprobs: list[float] = []

    def slots_needed(self, n: int) -> dict[str, int]:
        return {"base": n}

    def run(self, ctx: Any) -> Any:
        import torch

        from ..engine.primitives import Extend

        seq = ctx.new_seq("base")
        n = len(ctx.prompt_ids)
        [out] = yield [Extend(seq, list(ctx.prompt_ids) + self.answer, logits="all")]
        lp = torch.log_softmax(out.logits[n - 1:-1].float() / self.temperature, dim=-1)
        ids = torch.tensor(self.answer, device=lp.device)[:, None]
        self.logprobs = lp.gather(1, ids)[:, 0].tolist()


class HttpBackend:
    """A live server through the official ``openai`` client (chat completions).
    ``no_repeat_ngram_size`` (attribute, default 0 = off) goes into every request."""

    no_repeat_ngram_size: int = 0

    def _extra_body(self, alignment: dict[str, Any] | None) -> dict[str, Any] | None:
        """The non-OpenAI request fields: ``alignment`` and ``no_repeat_ngram_size`` when set."""
        extra: dict[str, Any] = {}
        if alignment:
            extra["alignment"] = alignment
        if self.no_repeat_ngram_size:
            extra["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return extra or None

    def __init__(self, url: str, api_key: str = "unused", model: str | None = None) -> None:
        import httpx
        from openai import OpenAI

        from ..value_models.heads import Head
        from ..value_models.registry import Registry
        from ..value_models.rewards import default_rewards

        self.url = url.rstrip("/")
        self.client = OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=2,
                             timeout=3600)
        self.model = model or self.client.models.list().data[0].id
        hdr = {"Authorization": f"Bearer {api_key}"}
        listing = httpx.get(self.url + "/v1/heads", headers=hdr, timeout=30).json()
        rows = listing.get("heads", listing.get("data", [])) if isinstance(listing, dict) \
            else listing
        heads = []
        for row in rows:
            kind = {"value_head": "value", "arm": "arm"}.get(row.get("kind"))
            if kind:  # a stand-in: only name, kind and the approximated reward are needed here
                heads.append(Head(row["name"], kind, None,  # type: ignore[arg-type]
                                  {"reward": row.get("reward") or ""}))
        rewards = default_rewards()
        served = {row.get("name") for row in rows}
        self.registry = Registry({k: v for k, v in rewards.items() if k in served or not rows},
                                 heads)
        self.device = f"server {self.url} (model {self.model})"

    def generate(self, jobs: Sequence[Job], alignment: dict[str, Any] | None, max_tokens: int,
                 concurrency: int, on_done: Callable[[], None],
                 temperature: float = 1.0) -> list[Response]:
        def one(job: Job) -> Response:
            t0 = time.perf_counter()
            r = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": job.prompt}],
                max_tokens=max_tokens, temperature=temperature, seed=job.seed, logprobs=True,
                extra_body=self._extra_body(alignment))
            wall = time.perf_counter() - t0
            ch = r.choices[0]
            lps = [float(t.logprob) for t in (ch.logprobs.content or [])] if ch.logprobs else []
            summary = (r.model_extra or {}).get("alignment") or {}
            return Response(ch.message.content or "", lps,
                            int(summary.get("tokens_generated", len(lps))),
                            int(summary.get("guidance_forwards", 0)), wall)

        return _run_pool(one, jobs, concurrency, on_done)

    def close(self) -> None:
        self.client.close()


# ---- scoring --------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Everything that defines a run (stored in results.json for reproducibility)."""

    strategies: list[str]
    objective: str = "sentiment"
    suite: str = "mixed"
    prompts: int = 16
    max_tokens: int = 48
    seeds: int = 2
    sweeps: list[str] = field(default_factory=list)
    bon_curve: bool = False
    concurrency: int = 8
    reward_options: dict[str, Any] = field(default_factory=dict)
    coherence: bool = True


def _nanmean(x: Sequence[float]) -> float:
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def score_responses(registry: Any, objectives: Sequence[Objective], prompts: Sequence[str],
                    texts: Sequence[str], reward_options: Mapping[str, Any]
                    ) -> dict[str, np.ndarray]:
    """Per-objective rewards of each (prompt, text) pair, scored with the registry's sources."""
    cache: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for ob in objectives:
        total = np.zeros(len(texts))
        for r, w in ob.score.items():
            if r not in cache:
                opts = [dict(reward_options.get(r, {}))] * len(texts)
                cache[r] = np.asarray(registry.rewards[r].score(list(prompts), list(texts), opts),
                                      dtype=np.float64)
            total = total + w * cache[r]
        out[ob.name] = total
    return out


def _per_prompt(values: np.ndarray, jobs: Sequence[Job]) -> np.ndarray:
    """Average over seeds per prompt, so the interval counts prompts, not correlated samples."""
    groups: dict[int, list[float]] = {}
    for v, j in zip(values, jobs):
        groups.setdefault(j.prompt_index, []).append(float(v))
    return np.asarray([np.mean(groups[k]) for k in sorted(groups)])


#: strategies that sample every returned token from an explicit per-token distribution, so
#: sum_t (log pi(y_t) - log p(y_t)) over their own samples is an unbiased KL(pi || p) estimate
TOKENWISE = {"sample", "args", "vas", "cd", "genarm", "transfer_qstar"}


def kl_monte_carlo(setting: Setting, resp: Sequence[Response]) -> float | None:
    """Mean over responses of sum_t (log pi(y_t) - log p_base(y_t)) (token-wise strategies).

    The engine records both log-probabilities of every emitted token (``TokenInfo``); the
    estimate is exact in expectation. ``None`` where the policy has no per-token form (Best-of-N,
    blockwise CD, DeAL choose whole sequences) or the logprobs are unavailable (HTTP backend).
    """
    if setting.strategy not in TOKENWISE:
        return None
    sums = []
    for r in resp:
        if r.error is not None or r.policy_logprobs is None:
            return None
        d = [a - b for a, b in zip(r.policy_logprobs, r.base_logprobs)
             if math.isfinite(a) and math.isfinite(b)]
        sums.append(float(sum(d)))
    return float(np.mean(sums)) if sums else None


def kl_bound(setting: Setting, mean_tokens: float) -> float | None:
    """Analytic KL where the strategy has one (Best-of-N exact, blockwise CD an upper bound)."""
    if setting.strategy == "sample":
        return 0.0
    from ..decoders import STRATEGIES

    a = setting.alignment or {}

    def opt(name: str) -> int:
        return int(a.get(name, STRATEGIES[setting.strategy].Options.model_fields[name].default))

    if setting.strategy == "best_of_n":
        from ..decoders.best_of_n import BestOfN

        if BestOfN({k: v for k, v in a.items() if k != "strategy"}).prunes:
            return None  # early rejection: the Best-of-N formula does not hold
        return bon_kl_bound(opt("n"))
    if setting.strategy == "cd_block":
        k, m = opt("k"), opt("block")
        return bon_kl_bound(k) * math.ceil(max(mean_tokens, 1.0) / m)
    return None


def summarize(setting: Setting, jobs: Sequence[Job], resp: Sequence[Response],
              rewards: Mapping[str, np.ndarray], objectives: Sequence[Objective],
              base: Mapping[str, Any] | None, wall_s: float,
              embed: Callable[[list[str]], np.ndarray] | None) -> dict[str, Any]:
    """All figures of merit of one setting (``base`` = plain sampling's raw data, or None)."""
    wsum = sum(abs(o.weight) for o in objectives) or 1.0
    combined = sum(o.weight * rewards[o.name] for o in objectives) / wsum
    row: dict[str, Any] = {"strategy": setting.strategy, "setting": setting.label,
                           "params": setting.params, "alignment": setting.alignment,
                           "reference": setting.reference, "responses": len(resp),
                           "errors": sum(r.error is not None for r in resp)}
    m, lo, hi = mean_ci95(_per_prompt(combined, jobs))
    row.update(reward=m, reward_lo=lo, reward_hi=hi)
    row["rewards"] = {}
    for ob in objectives:
        om, olo, ohi = mean_ci95(_per_prompt(rewards[ob.name], jobs))
        row["rewards"][ob.name] = {"mean": om, "lo": olo, "hi": ohi}
    texts = [r.text for r in resp]
    ntok = np.asarray([r.n_tokens for r in resp], dtype=np.float64)
    nll = np.asarray([-_nanmean(r.base_logprobs) if r.n_tokens else 0.0 for r in resp])
    if base is not None:
        row["win_rate"] = win_rate(combined, base["combined"])
        row["win_rates"] = {o.name: win_rate(rewards[o.name], base["rewards"][o.name])
                            for o in objectives}
        ref = np.asarray([base["nll_by_prompt"][j.prompt_index] for j in jobs])
        row["kl_proxy"] = 0.0 if setting.strategy == "sample" else float(
            np.nanmean(ntok * (nll - ref)))
    else:
        row["win_rate"], row["win_rates"], row["kl_proxy"] = math.nan, {}, math.nan
    mean_tok = float(ntok.mean()) if ntok.size else 0.0
    row["kl_bound"] = kl_bound(setting, mean_tok)
    row["kl_mc"] = kl_monte_carlo(setting, resp)
    if row["kl_bound"] is not None:
        row["kl"] = row["kl_bound"]
        row["kl_source"] = "bound" if setting.strategy == "cd_block" else "exact"
    elif row["kl_mc"] is not None:
        row["kl"], row["kl_source"] = row["kl_mc"], "mc"
    else:
        row["kl"], row["kl_source"] = row["kl_proxy"], "ce-proxy"
    row["diversity"] = diversity(texts)
    row["distinct_1"] = distinct_n(texts, 1)
    row["distinct_2"] = distinct_n(texts, 2)
    row["coherence"] = coherence([j.prompt for j in jobs], texts, embed) if embed else math.nan
    returned = float(ntok.sum())
    row["mean_tokens"] = mean_tok
    row["tokens_per_s"] = returned / wall_s if wall_s > 0 else math.nan
    row["wall_s_per_response"] = float(np.mean([r.wall_s for r in resp]))
    row["batch_wall_s"] = wall_s
    gen = sum(r.tokens_generated for r in resp)
    row["tokens_per_returned"] = gen / returned if returned else math.nan
    row["guidance_per_token"] = sum(r.guidance_forwards for r in resp) / returned \
        if returned else math.nan
    return row


def _base_data(jobs: Sequence[Job], resp: Sequence[Response], rewards: Mapping[str, np.ndarray],
               objectives: Sequence[Objective]) -> dict[str, Any]:
    """What later settings compare against: plain sampling's rewards and per-prompt NLL."""
    wsum = sum(abs(o.weight) for o in objectives) or 1.0
    tot: dict[int, list[float]] = {}
    for j, r in zip(jobs, resp):
        lp = [x for x in r.base_logprobs if math.isfinite(x)]
        acc = tot.setdefault(j.prompt_index, [0.0, 0.0])
        acc[0] += -sum(lp)
        acc[1] += len(lp)
    # token-weighted pooling over seeds: sampling's own proxy is then exactly 0
    nll = {k: (v[0] / v[1] if v[1] else 0.0) for k, v in tot.items()}
    return {"combined": sum(o.weight * rewards[o.name] for o in objectives) / wsum,
            "rewards": dict(rewards), "nll_by_prompt": nll}


def make_jobs(prompts: Sequence[str], seeds: int, seed0: int = 0) -> list[Job]:
    """Every prompt x seed; seeds are shared by all settings so comparisons are paired."""
    return [Job(i, p, seed0 + 1_000_003 * s + i) for s in range(seeds)
            for i, p in enumerate(prompts)]


def run_eval_config(cfg: EvalConfig, backend: Backend, out: Path | None = None,
                    progress: bool = True, warn: Callable[[str], None] = log.warning
                    ) -> dict[str, Any]:
    """Run every setting of ``cfg`` on ``backend``; write outputs to ``out`` when given.

    Returns the results document (what ``results.json`` holds).
    """
    from ..data.prompts import load_prompts
    from ..progress import progress_bar

    test = load_prompts("test", cfg.suite)  # the held-out split, and only it
    if cfg.prompts and cfg.prompts < len(test):
        test = test[:cfg.prompts]
    prompts = [p.text for p in test]
    objectives = resolve_objectives(cfg.objective, backend.registry)
    settings = build_settings(cfg.strategies, cfg.sweeps, objectives, backend.registry,
                              cfg.bon_curve, cfg.reward_options, warn)
    jobs = make_jobs(prompts, cfg.seeds)
    embed = None
    if cfg.coherence:
        from ..value_models.rewards import minilm_embed
        embed = minilm_embed
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[dict[str, Any]]] = {}
    base: dict[str, Any] | None = None
    bar = progress_bar(total=len(settings) * len(jobs), desc="eval", unit="resp",
                       disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        for st in settings:
            bar.set_postfix_str(st.key, refresh=False)
            t0 = time.perf_counter()
            resp = backend.generate(jobs, st.alignment, cfg.max_tokens, cfg.concurrency,
                                    lambda: bar.update(1))
            wall = time.perf_counter() - t0
            for r in resp:
                if r.error:
                    warn(f"{st.key}: a response failed: {r.error}")
                    break
            rewards = score_responses(backend.registry, objectives, prompts_of(jobs),
                                      [r.text for r in resp], cfg.reward_options)
            if st.strategy == "sample":
                base = _base_data(jobs, resp, rewards, objectives)
            rows.append(summarize(st, jobs, resp, rewards, objectives, base, wall, embed))
            samples[st.key] = [{"prompt": j.prompt, "seed": j.seed, "text": r.text,
                                **{o.name: float(rewards[o.name][i]) for o in objectives}}
                               for i, (j, r) in enumerate(zip(jobs, resp))
                               if i < len(prompts)]  # first seed only, to keep the file small
    finally:
        bar.close()
    doc = {"config": asdict(cfg), "device": backend.device,
           "objectives": [asdict(o) for o in objectives],
           "prompts": [{"id": p.id, "category": p.category} for p in test],
           "split": "test", "wall_s": time.perf_counter() - t_start,
           "results": rows, "bon_curve": bon_points(rows), "samples": samples}
    if out is not None:
        write_outputs(doc, Path(out))
    return doc


def prompts_of(jobs: Iterable[Job]) -> list[str]:
    return [j.prompt for j in jobs]


def bon_points(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """The Best-of-N reference curve: (N, analytic KL, mean reward), N=1 is plain sampling."""
    pts = []
    for r in rows:
        if r["reference"]:
            n = int(r["params"]["n"])
            pts.append({"n": n, "kl": bon_kl_bound(n), "reward": r["reward"]})
    return sorted(pts, key=lambda p: p["n"])


# ---- outputs --------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(doc: Mapping[str, Any]) -> str:
    """The results as one Markdown table, with a header line saying what was run where."""
    cfg = doc["config"]
    obj = ", ".join(f"{o['name']}×{o['weight']:g}" for o in doc["objectives"])
    lines = [
        f"Objective {obj}; {len(doc['prompts'])} held-out test prompts ({cfg['suite']}) × "
        f"{cfg['seeds']} seeds, {cfg['max_tokens']} new tokens, temperature 1; "
        f"{doc['device']}, concurrency {cfg['concurrency']}.",
        "",
        "| strategy | setting | reward [95% CI] | win vs base | KL (source) | KL proxy | "
        "diversity | distinct-2 | coherence | tok/s | s/resp | gen tok/tok | guid fwd/tok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        src = {"ce-proxy": "proxy"}.get(r["kl_source"], r["kl_source"])
        lines.append(
            f"| {r['strategy']} | {r['setting']} | {_fmt(r['reward'])} "
            f"[{_fmt(r['reward_lo'])}, {_fmt(r['reward_hi'])}] | {_fmt(r['win_rate'], 2)} | "
            f"{_fmt(r['kl'], 2)} ({src}) | {_fmt(r['kl_proxy'], 2)} | {_fmt(r['diversity'], 2)} | "
            f"{_fmt(r['distinct_2'], 2)} | {_fmt(r['coherence'], 2)} | "
            f"{_fmt(r['tokens_per_s'], 1)} | {_fmt(r['wall_s_per_response'], 2)} | "
            f"{_fmt(r['tokens_per_returned'], 1)} | {_fmt(r['guidance_per_token'], 2)} |")
    lines += [
        "",
        "KL: Best-of-N `log N − (N−1)/N` (exact), cd_block `(log K − (K−1)/K)·blocks` (bound); "
        "token-wise strategies in-process: Monte-Carlo `Σ_t log π(y_t) − log p(y_t)` (mc); "
        "otherwise the cross-entropy proxy `T·(NLL_base(strategy) − NLL_base(plain))`, which "
        "assumes the strategy keeps the base's entropy (negative = sharper than the base). "
        "Win rate: paired on prompt and seed, ties ½. Interval: Student t over prompts.",
    ]
    if len(doc["objectives"]) > 1:
        lines.append("")
        lines.append("| strategy | setting | " + " | ".join(
            f"{o['name']} [95% CI] | win" for o in doc["objectives"]) + " |")
        lines.append("|---|---|" + "---|---|" * len(doc["objectives"]))
        for r in doc["results"]:
            cells = []
            for o in doc["objectives"]:
                s = r["rewards"][o["name"]]
                cells.append(f"{_fmt(s['mean'])} [{_fmt(s['lo'])}, {_fmt(s['hi'])}] | "
                             f"{_fmt(r['win_rates'].get(o['name']), 2)}")
            lines.append(f"| {r['strategy']} | {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    """NaN/inf become null (strict JSON), numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_outputs(doc: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Write results.json, results.md, reward_vs_kl.png and reward_vs_compute.png."""
    from .plots import plot_reward_vs_compute, plot_reward_vs_kl

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md",
             "kl_png": out / "reward_vs_kl.png", "compute_png": out / "reward_vs_compute.png"}
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=2) + "\n")
    paths["md"].write_text(markdown_table(doc))
    # points of the Best-of-N curve are drawn as the curve, not again as markers
    rows = [r for r in doc["results"] if not (r["reference"] and doc["bon_curve"])]
    ok = [r for r in rows if all(math.isfinite(float(r[k])) for k in ("reward", "kl"))]
    plot_reward_vs_kl(ok, doc["bon_curve"], paths["kl_png"],
                      xlabel="KL per response [nats]: analytic (Best-of-N, cd_block), "
                             "Monte-Carlo (token-wise), else cross-entropy proxy (DeAL)")
    comp = [r for r in doc["results"] if math.isfinite(float(r["tokens_per_returned"]))
            and float(r["tokens_per_returned"]) > 0]
    plot_reward_vs_compute(comp, paths["compute_png"],
                           xlabel="Tokens generated per returned token (log scale)")
    return paths
