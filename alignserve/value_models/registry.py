"""What a deployment can steer with: the built-in reward sources plus the loaded heads.

The server builds one ``Registry`` at start-up and hands it to the engine as opaque
``resources``; strategies look up rewards and heads by name, and ``/v1/heads`` lists
``describe()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import RewardInfo, RewardSource
from .heads import Head, load_heads


class Registry:
    def __init__(self, rewards: Mapping[str, RewardSource] | None = None,
                 heads: list[Head] | None = None) -> None:
        self.rewards: dict[str, RewardSource] = dict(rewards or {})
        self.heads: dict[str, Head] = {h.name: h for h in heads or []}
        self.note: str | None = None  # why some heads are not loaded, for "no head" errors
        clash = set(self.rewards) & set(self.heads)
        if clash:
            raise ValueError(f"head names clash with built-in rewards: {sorted(clash)}")

    @classmethod
    def build(cls, heads_dir: Path | list[Path] | None = None, fingerprint: str | None = None,
              dim: int | None = None, judge_scorer: Any = None,
              default_heads: bool = False) -> Registry:
        """Built-in rewards plus the heads of every folder in ``heads_dir`` (in order; a later
        folder's head replaces an earlier one of the same name), after the package's default
        heads when ``default_heads`` (so ``--heads DIR`` can override a shipped head).

        Raises:
            HeadError: a folder is missing, a head is unreadable, built for another tokenizer
                or hidden size, or two heads in one folder share a name.
        """
        from .heads import default_heads_dir
        from .rewards import default_rewards

        dirs: list[Path] = [default_heads_dir()] if default_heads and default_heads_dir().is_dir() \
            else []
        if isinstance(heads_dir, (str, Path)):
            dirs.append(Path(heads_dir))
        elif heads_dir:
            dirs.extend(Path(d) for d in heads_dir)
        by_name: dict[str, Head] = {}
        for d in dirs:
            by_name.update({h.name: h for h in load_heads(d, fingerprint, dim)})
        return cls(default_rewards(judge_scorer), list(by_name.values()))

    def infos(self) -> dict[str, RewardInfo]:
        out = {n: r.info for n, r in self.rewards.items()}
        out.update({n: h.info for n, h in self.heads.items()})
        return out

    def heads_for(self, reward: str, kind: str) -> Head | None:
        """The head of ``kind`` trained for ``reward`` (by name, or the reward it approximates).
        A head's own name resolves to that head only: None when it is of another kind (so
        ``sentiment_lex``, a value head, does not read ``sentiment_lex_arm`` in GenARM)."""
        h = self.heads.get(reward)
        if h is not None:
            return h if h.kind == kind else None
        h = self.heads.get(f"{reward}_{kind}")  # the conventional name wins over other heads
        if h is not None and h.kind == kind:    # of the reward (e.g. a lexical concise_lex)
            return h
        for h in self.heads.values():
            if h.kind == kind and h.manifest.get("reward") == reward:
                return h
        return None

    def describe(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for name, r in sorted(self.rewards.items()):
            i = r.info
            rows.append({"name": name, "kind": i.kind, "description": i.description,
                         "range": list(i.range), "weight_range": list(i.weight_range),
                         "options": dict(i.options)})
        for _, h in sorted(self.heads.items()):
            rows.append(h.describe())
        return rows
