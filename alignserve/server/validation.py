"""Edge checks of request bodies that pydantic's types alone do not make.

JSON may carry strings that are not text: ``"\\ud800"`` is legal JSON (a lone UTF-16 surrogate)
and decodes to a Python ``str`` that cannot be encoded as UTF-8, so the tokenizer, the regex
engine or the response encoder would fail on it deep inside a handler. ``check_text`` walks a
parsed body once, before any field is validated, and reports the dotted path of the first such
string (``messages.0.content``, ``alignment.reward_options.keywords.keywords.1``) as a
pydantic error of type ``invalid_text`` whose ``ctx["param"]`` the HTTP layer turns into the
400's ``param``. Every string is checked, dictionary keys included, whatever field it sits in,
so a field added later is covered without a new rule.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticCustomError

INVALID_TEXT = "invalid_text"


def _bad(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def first_bad_text(value: Any) -> tuple[str, bool] | None:
    """The first string in ``value`` (parsed JSON) that is not valid Unicode text.

    Returns ``(path, is_key)``: the dotted path of the string (list indices as numbers), or for
    a bad dictionary key the path of the dictionary holding it, with ``is_key`` True; ``None``
    when every string encodes as UTF-8. Iterative, so a deeply nested body cannot exhaust the
    stack; order is depth-first in document order.
    """
    stack: list[tuple[tuple[str, ...], Any]] = [((), value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _bad(v):
                return ".".join(path), False
        elif isinstance(v, dict):
            items = list(v.items())
            for k, _ in items:
                if isinstance(k, str) and _bad(k):
                    return ".".join(path), True
            stack.extend((path + (str(k),), x) for k, x in reversed(items))
        elif isinstance(v, list | tuple):
            stack.extend((path + (str(i),), x) for i, x in reversed(list(enumerate(v))))
    return None


def check_text(data: Any) -> Any:
    """Pydantic ``mode="before"`` model validator: refuse a body holding non-text strings.

    Raises ``PydanticCustomError("invalid_text", ...)`` with ``ctx={"param": path}`` (``None``
    for a bad top-level field name); returns ``data`` unchanged otherwise.
    """
    found = first_bad_text(data)
    if found is None:
        return data
    path, is_key = found
    what = "holds a key that is" if is_key else "is"
    where = f"'{path}'" if path else "the request body"
    if is_key and not path:
        what, where = "has a field name that is", "the request body"
    raise PydanticCustomError(
        INVALID_TEXT,
        "{where} {what} not valid Unicode text (a lone UTF-16 surrogate such as \\ud800 cannot "
        "be encoded as UTF-8)",
        {"param": path or None, "where": where, "what": what})


def invalid_text_error(errors: list[dict[str, Any]]) -> tuple[str, str | None] | None:
    """``(message, param)`` when a validation error list holds an ``invalid_text`` error."""
    for e in errors:
        if e.get("type") == INVALID_TEXT:
            return str(e.get("msg")), (e.get("ctx") or {}).get("param")
    return None
