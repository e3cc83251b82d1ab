"""The one small interface every sequence-level reward source implements.

A reward source scores a batch of (prompt, response) pairs. Requests in one batch may carry
different per-request options (a target length, a keyword list, a judge question), so options
come per row. Scores are plain floats; each source documents its range in ``info.range``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class RewardInfo:
    """What ``GET /v1/heads`` shows about a reward source or guidance head."""

    name: str
    kind: str  # "reward" (sequence level), "value_head", "arm"
    description: str
    range: tuple[float, float]  # documented range of the raw score
    weight_range: tuple[float, float] = (-10.0, 10.0)  # allowed per-request weight
    options: Mapping[str, str] = field(default_factory=dict)  # option name -> description


@runtime_checkable
class RewardSource(Protocol):
    """Scores complete (prompt, response) pairs. Higher is better for the objective."""

    info: RewardInfo

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        options: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[float]:
        """One float per pair. ``options[i]`` holds request ``i``'s options for this source."""
        ...


class RewardOptionError(ValueError):
    """A per-request option for a reward source is invalid; ``field`` names it for the 400."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
