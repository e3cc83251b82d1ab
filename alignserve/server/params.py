"""Request checks beyond the schemas: the model name and its alias, the server's caps, and the
translation of a request body into ``SamplingParams``. Each raises ``APIError`` (400/404)
naming the field."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ..decoders import STRATEGIES
from ..engine.api import ContextLengthError
from ..engine.sampling import SamplingParams
from .errors import APIError
from .state import ServerState

# alignment fields that multiply work per request (samples, candidates, beams, rollout lengths):
# ``--max-candidates`` caps them all, below each strategy's own published-range maximum
CANDIDATE_FIELDS = ("n", "k", "top_k", "beams", "rollout", "lookahead", "block")


def strategy_of(alignment: dict[str, Any] | None) -> str:
    """The strategy a request asked for, as a metrics label (unknown names are bounded)."""
    name = (alignment or {}).get("strategy", "sample")
    return name if isinstance(name, str) and name in STRATEGIES else "invalid"


def check_model(srv: ServerState, model: str) -> str | None:
    """Accept the served name or an alias ``NAME:STRATEGY``; returns the alias strategy."""
    base, _, strategy = model.partition(":")
    if base != srv.model_name or (strategy and strategy not in STRATEGIES):
        raise APIError(404, f"The model '{model}' does not exist; available: {srv.model_name} "
                       f"and {srv.model_name}:STRATEGY with STRATEGY in {sorted(STRATEGIES)}",
                       "model", "model_not_found")
    return strategy or None


def with_alias(srv: ServerState, body: Any, request: Request) -> dict[str, Any] | None:
    """The request's alignment, with the model alias's strategy and default weights; checks
    the server's candidate cap and labels the request's metrics with its strategy."""
    strategy = check_model(srv, body.model)
    if strategy is None:
        spec = body.alignment
    else:
        given = (body.alignment or {}).get("strategy")
        if given is not None and given != strategy:
            raise APIError(400, f"alignment.strategy '{given}' conflicts with the model alias "
                                f"'{body.model}' (strategy '{strategy}'): drop one, or make "
                                "them agree", "alignment.strategy", "invalid_value")
        spec = {"strategy": strategy, **(body.alignment or {})}
        if strategy != "sample" and "weights" not in spec:
            aw = srv.alias_weights
            spec["weights"] = dict(aw.get(strategy, aw["*"]))
    request.state.strategy = strategy_of(spec)
    check_candidates(srv, spec)
    return spec


def check_candidates(srv: ServerState, spec: dict[str, Any] | None) -> None:
    """Server-level cap on the alignment fields that multiply a request's work; the strategy
    still validates its own (wider) range and types afterwards."""
    cap = srv.limits.max_candidates
    if not spec or cap is None:
        return
    for name in CANDIDATE_FIELDS:
        v = spec.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > cap:
            raise APIError(400, f"alignment.{name} must be at most {cap} on this server "
                                f"(got {v})", f"alignment.{name}", "invalid_value")


def check_n(srv: ServerState, n: int) -> None:
    if n > srv.limits.max_n:
        raise APIError(400, f"n must be between 1 and {srv.limits.max_n}", "n", "invalid_value")


def check_stream_options(body: Any) -> None:
    """``stream_options`` only means something on a stream: without ``stream: true`` it is a
    400 (as OpenAI and vLLM answer), not silently ignored."""
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       "stream_options")


def check_max_tokens(srv: ServerState, v: int | None, default: int, field: str,
                     least: int = 0) -> int:
    """``v`` (or ``default`` when unset) within the server's ``--max-tokens``; ``least`` is the
    endpoint's own minimum (0 for completions, 1 for chat), quoted in the 400."""
    if v is None:
        return min(default, srv.limits.max_tokens)
    if v > srv.limits.max_tokens:
        raise APIError(400, f"{field} must be between {least} and {srv.limits.max_tokens}",
                       field, "invalid_value")
    return v


def fit_max_tokens(srv: ServerState, n_prompt: int, max_tokens: int, defaulted: bool,
                   prompt_field: str = "prompt") -> int:
    """``max_tokens`` checked against the context window (an unset one shrinks to fit).

    Raises ``APIError`` 400 ``context_length_exceeded`` whose ``param`` is ``prompt_field``
    (``prompt`` for completions, ``messages`` for chat)."""
    client = srv.client
    room = client.max_len - n_prompt - 1  # what an unset max_tokens may take (one spare)
    try:
        if n_prompt >= client.max_len or (defaulted and room < 1):
            # the prompt alone fills the window: say so (an unset max_tokens is not "0")
            raise ContextLengthError(f"This model's maximum context length is "
                                     f"{client.max_len} tokens; the prompt has {n_prompt}, "
                                     "which leaves no room for output.")
        if defaulted:  # an unset max_tokens shrinks to the room left, as OpenAI does
            max_tokens = min(max_tokens, room)
        client.check_fits(n_prompt, max_tokens)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), prompt_field, "context_length_exceeded") from None
    return max_tokens


def check_top_logprobs(spec: dict[str, Any] | None, n_top: int, field: str) -> None:
    """Strategies that return a whole chosen sample report each token's logprob but no top
    alternatives: asking for them is a 400, not an empty list."""
    cls = STRATEGIES.get(strategy_of(spec))
    if n_top and cls is not None and not cls.reports_top_logprobs:
        raise APIError(400, f"{field}: strategy '{cls.name}' returns whole chosen samples "
                            "and reports each token's logprob but no top alternatives; "
                            f"set {field} to 0", field)


def sampling(srv: ServerState, body: Any, max_tokens: int, n_top: int,
             logprobs: bool) -> SamplingParams:
    """The request's ``SamplingParams``; token ids checked against the vocabulary."""
    seed = None if body.seed is None else int(body.seed) % (2**63)
    bias = body.logit_bias_ids()
    vocab = srv.client.engine.base.config.vocab_size
    for name, ids in (("logit_bias", list(bias)), ("stop_token_ids", body.stop_token_ids)):
        bad = [t for t in ids or [] if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{name}: token id {bad[0]} is outside the vocabulary "
                                f"[0, {vocab})", name, "invalid_value")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must not exceed the maximum "
                            f"number of tokens ({max_tokens})", "min_tokens", "invalid_value")
    return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          max_tokens=max_tokens, stop=body.stop or [], seed=seed,
                          logprobs=logprobs, top_logprobs=n_top, ignore_eos=body.ignore_eos,
                          presence_penalty=body.presence_penalty,
                          frequency_penalty=body.frequency_penalty,
                          repetition_penalty=body.repetition_penalty, logit_bias=bias,
                          min_tokens=body.min_tokens,
                          stop_token_ids=list(body.stop_token_ids or []),
                          no_repeat_ngram_size=body.no_repeat_ngram_size)
