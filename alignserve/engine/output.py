"""Turning emitted tokens into text: incremental detokenization, stop strings, finish reasons.

Every strategy emits token ids for a choice; this module alone decides when a choice is finished
(EOS, a stop string, ``max_tokens``) and which text delta may be streamed. Text that could still be
the start of a stop string is held back until it is known not to be one, so a stop string never
leaks into the output, streamed or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenInfo:
    """One emitted token: ``logprob`` under the base model, ``policy_logprob`` under the
    distribution it was actually sampled from (guidance, temperature and truncation applied);
    their difference summed over a response is the Monte-Carlo estimate of KL(policy || base)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    policy_logprob: float | None = None


@dataclass
class ChoiceState:
    max_tokens: int
    stop: list[str]
    eos_ids: set[int]
    tokens: list[int] = field(default_factory=list)
    infos: list[TokenInfo] = field(default_factory=list)
    text: str = ""  # final (stop-trimmed) text, valid once finished
    sent: int = 0  # characters of text already streamed
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, st: ChoiceState, info: TokenInfo) -> str:
        """Add one token to a choice; returns the text delta that may be streamed now."""
        if st.finished:
            return ""
        if info.token in st.eos_ids:
            st.finish_reason = "stop"
            return self._flush(st, self.decode(st.tokens))
        st.tokens.append(info.token)
        st.infos.append(info)
        text = self.decode(st.tokens)
        for s in st.stop:
            at = text.find(s, max(0, st.sent - len(s)))
            if at >= 0:
                st.finish_reason = "stop"
                return self._flush(st, text[:at])
        if len(st.tokens) >= st.max_tokens:
            st.finish_reason = "length"
            return self._flush(st, text)
        # hold back an incomplete UTF-8 character and any tail that may begin a stop string
        safe = len(text.rstrip("\ufffd"))
        for s in st.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    safe = min(safe, len(text) - n)
                    break
        st.text = text
        if safe > st.sent:
            delta = text[st.sent:safe]
            st.sent = safe
            return delta
        return ""

    def finish(self, st: ChoiceState, reason: str) -> str:
        """Force-finish a choice (e.g. the strategy stopped); returns the remaining delta."""
        if st.finished:
            return ""
        st.finish_reason = reason
        return self._flush(st, self.decode(st.tokens))

    @staticmethod
    def _flush(st: ChoiceState, text: str) -> str:
        st.text = text
        delta = text[st.sent:]
        st.sent = len(text)
        return delta
