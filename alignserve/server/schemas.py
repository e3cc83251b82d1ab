"""Request schemas (pydantic): every field validated at the edge with its allowed range.

Every field a request may carry does what it says or is refused with a 400 naming it:
- fields declared below are honoured (see the README's API section);
- ``IGNORED_FIELDS`` have no effect on the output (bookkeeping such as ``user`` or ``store``):
  accepted and dropped;
- ``UNSUPPORTED_FIELDS`` are OpenAI features this server does not implement: a 400 naming the
  field unless the value is one that changes nothing (null, ``response_format`` text, ...);
- anything else is unknown: a 400 naming it (``extra="forbid"``).
The ``alignment`` object is passed on to the strategy layer, which validates it.
Types are strict, as OpenAI's API and our published schema say: numbers are JSON numbers (an
integer is accepted where a float is expected), integers are integers, booleans are booleans; a
string ``"1"`` or ``true`` for a number is a 400 naming the field. Every string in the body,
known field or not, must be valid Unicode text (``validation.check_text``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .validation import check_text

# accepted and ignored: none of them changes what is generated
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier",
                  "prompt_cache_key", "parallel_tool_calls")


def _no_tools(v: Any) -> bool:
    return v in (None, "none")


# OpenAI features we do not implement -> predicate telling whether a value is a harmless no-op
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "suffix": lambda v: v in (None, ""),
    "tools": lambda v: v in (None, []),
    "tool_choice": _no_tools,
    "functions": lambda v: v in (None, []),
    "function_call": _no_tools,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "verbosity": lambda v: v is None,
}
# fields of an assistant message returned by OpenAI-style APIs that clients echo back
MESSAGE_OUTPUT_FIELDS = ("refusal", "annotations", "audio", "tool_calls", "function_call",
                         "name", "tool_call_id")


def _refuse(field: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_field", "{message}",
                               {"field": field, "message": message})


def _screen(data: Any, unsupported: dict[str, Any], ignored: tuple[str, ...]) -> Any:
    """Drop ignored fields; refuse unsupported ones that would change the output."""
    if not isinstance(data, dict):
        return data
    out = {}
    for k, v in data.items():
        if k in ignored:
            continue
        check = unsupported.get(k)
        if check is not None:
            if not check(v):
                raise _refuse(k, f"'{k}' is not supported by this server (only "
                                 "plain text generation; see the README's API section)")
            continue
        out[k] = v
    return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="0 = off (extension, as in vLLM)")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM extras that clients migrating from vLLM send
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    # Hugging Face generate's: no n-gram of the answer occurs twice (0 = off)
    no_repeat_ngram_size: int = Field(0, ge=0, le=64)
    ignore_eos: bool = False
    alignment: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _screen_fields(cls, data: Any) -> Any:
        # a lone surrogate anywhere is a 400, never a 500; then drop / refuse by name
        return _screen(check_text(data), UNSUPPORTED_FIELDS, IGNORED_FIELDS)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return None
        if len(v) > 300:
            raise ValueError("at most 300 entries are allowed")
        for k, b in v.items():
            if not re.fullmatch(r"-?[0-9]{1,12}", k):
                raise ValueError(f"keys must be token ids as strings, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"bias for token {k} must be between -100 and 100, got {b}")
        return v

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): float(b) for k, b in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return items


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _screen_fields(cls, data: Any) -> Any:
        # output fields echoed back with a previous answer are fine while empty
        return _screen(data, {k: (lambda v: v in (None, [])) for k in MESSAGE_OUTPUT_FIELDS},
                       ())

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":  # OpenAI: only assistant turns
            raise ValueError(f"content is required for a '{self.role}' message")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
