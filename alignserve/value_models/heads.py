"""Token-level guidance heads: value heads (VAS, CD) and autoregressive reward models (GenARM).

Placement ``base``: a head reads the frozen base model's own final hidden state, so scoring costs
no extra transformer forward. With the engine's tree forward, the hidden states of k candidate
next tokens come out of the same forward that serves the step, so V([x, y<t, a]) for all k
candidates is one small matmul. Heads are tiny (tens of thousands to a few hundred thousand
parameters), train in minutes on cached hidden states, and are stored as safetensors.

- ``ValueHead``: V(prefix) = MLP(x_t) -> scalar, trained to predict the final reward of a base
  continuation (FUDGE / TD(lambda) / CD-Q targets, see ``training``). x_t is the state h_t, or
  with ``pool="mean"`` [h_t, mean(h_0..h_t)]: the mean over the response's states so far
  (``PrefixMean``), which carries what was said earlier in the answer, not only where it is now.
- ``QHead``: Q(prefix, a) - V(prefix) for every next token a from ONE state,
  ``E_a . (B (A h_t) + u)`` through the tied embedding matrix E, trained to match a value
  head's V on the extended prefixes [prefix, a]. VAS / CD read the k candidates' values from it
  with no k-token tree forward (``values: "q"``), at the cost of a [k, D] product per token.
- ``ARMHead``: log pi_r(a | prefix) = log_softmax(l_base + E (B (A h_t)))_a, a low-rank adapter
  through the tied embedding matrix E on top of the frozen base logits. Trained with GenARM's
  pairwise loss; at decode time GenARM adds alpha * log pi_r to the base log-probabilities.

Artifact format: a folder with ``manifest.json`` (kind, name, reward it approximates, tokenizer
fingerprint of the base it serves, architecture, training provenance, held-out metrics) and
``head.safetensors`` (a lexical head with whole-word features also ``lexicon.json``,
``lexical.Lexicon``). ``load_heads(dir, fingerprint)`` loads every head under a folder and refuses
one built for another tokenizer with a message naming both fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import RewardInfo

log = logging.getLogger("alignserve.heads")
MANIFEST = "manifest.json"
WEIGHTS = "head.safetensors"
# manifest "training" keys GET /v1/heads leaves out: the history (long) and the training
# machine's paths and command line
PRIVATE_TRAINING_KEYS = ("history", "command", "out", "run_dir", "sample_cache", "value_head")
FORMAT_VERSION = 1


class HeadError(ValueError):
    """A head folder cannot be used (bad manifest, wrong tokenizer, wrong shapes)."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary (token -> id), so a head trained on one base is not used on
    another whose ids mean different tokens."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return "vocab-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


POOLS = ("none", "mean")


def pool_width(dim: int, pool: str) -> int:
    """Width of a head's input over base states of size ``dim``: D, or 2D with
    ``pool="mean"`` ([h_t, mean(h_0..h_t)])."""
    return 2 * dim if _check_pool(pool) == "mean" else dim


class PrefixMean:
    """Running mean of one response's final hidden states, for heads with ``pool="mean"``.

    Such a head reads x_t = [h_t, mean(h_0, ..., h_t)] ([2D]), where h_0 is the state at the
    prompt's last token and h_i the state after the i-th response token: the same features
    ``training.mean_pool_features`` builds from the sample cache. The sum is kept in float32
    on the device of ``h0``.
    """

    def __init__(self, h0: Tensor) -> None:
        """``h0``: [D] or [1, D], the prompt's last state."""
        self.total = h0.detach().float().reshape(-1).clone()
        self.count = 1

    @classmethod
    def for_heads(cls, h0: Tensor, modules: Iterable[nn.Module]) -> PrefixMean | None:
        """A running mean started at ``h0`` when any of ``modules`` (head modules) reads
        pooled inputs, else None (no head needs one)."""
        return cls(h0) if any(getattr(m, "pool", "none") != "none" for m in modules) else None

    def current(self, h: Tensor) -> Tensor:
        """[N, D] the current state (already ``add``-ed, or h_0) -> [N, 2D] features."""
        h = h.float()
        return torch.cat([h, (self.total / self.count).expand_as(h)], -1)

    def extended(self, h: Tensor) -> Tensor:
        """[k, D] states of k candidate next tokens -> [k, 2D] features of each extension."""
        h = h.float()
        return torch.cat([h, (self.total + h) / (self.count + 1)], -1)

    def add(self, h: Tensor) -> None:
        """Append the state [D] (or [1, D]) of the token just committed."""
        self.total += h.detach().float().reshape(-1)
        self.count += 1


def head_input(module: nn.Module, h: Tensor, pool: PrefixMean | None,
               extended: bool) -> Tensor:
    """What a value head, Q-head or ARM adapter reads: ``h`` [N, D] itself, or for a head with
    ``pool="mean"`` ``pool.extended(h)`` (``h`` are candidate extensions) /
    ``pool.current(h)`` ([N, 2D]). Raises HeadError when a pooled head gets no ``pool``."""
    if getattr(module, "pool", "none") == "none":
        return h
    if pool is None:
        raise HeadError("a pool='mean' head needs the response's running mean (PrefixMean)")
    return pool.extended(h) if extended else pool.current(h)


class ValueHead(nn.Module):
    """V(x) = w2 . tanh(W1 x + b1) + b2, with inputs standardised by stored statistics.

    x is the state h [D], or [h, running mean of the response's states] [2D] with
    ``pool="mean"`` (``PrefixMean``, ``head_input``).

    ``forward`` returns the value in **reward standard deviations**: the head is trained on
    (r - r_mean) / r_std, where r_mean and r_std (buffers, also in the manifest's
    ``reward_stats``) are the reward's mean and spread over the base model's own samples. A VAS
    / CD weight beta is therefore "logits per reward standard deviation" and means the same for
    every reward. ``reward(h)`` maps back to the reward's own units. Heads saved before these
    buffers existed load with mean 0 and std 1 (their outputs are raw rewards).
    """

    def __init__(self, dim: int, hidden: int = 128, pool: str = "none") -> None:
        super().__init__()
        self.pool = _check_pool(pool)
        dim = pool_width(dim, pool)
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sigma", torch.ones(dim))
        self.register_buffer("r_mean", torch.zeros(()))
        self.register_buffer("r_std", torch.ones(()))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        """[..., D] hidden states ([..., 2D] features with ``pool="mean"``) -> [...] values in
        reward standard deviations (fp32)."""
        x = (h.float() - self.mu) / self.sigma
        return self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)

    def reward(self, h: Tensor) -> Tensor:
        """[..., D] -> [...] predicted reward in the reward's own units."""
        return self.r_mean + self.r_std * self(h)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # heads saved before the reward statistics existed predicted raw rewards: mean 0, std 1
        state_dict.setdefault(prefix + "r_mean", torch.zeros(()))
        state_dict.setdefault(prefix + "r_std", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QHead(nn.Module):
    """Advantage over the vocabulary from one state: Q(s, a) - V(s) = E_a . (B (A x) + u).

    ``x`` is the standardised final hidden state h_t of the prefix s (with ``pool="mean"``:
    [h_t, mean(h_0..h_t)], [2D], like ``ValueHead``), E [V, D] the base's tied
    embedding matrix, A [r, D] and B [D, r] a rank-r map and u [D] a state-free term (a token's
    own effect on the reward). Output in reward standard deviations, like ``ValueHead`` (it is
    distilled from one: the target is V([s, a]) - V(s) along the base's own samples). A
    regression on a weak feature shrinks its outputs towards 0, so after training ``scale``
    (a buffer) is set to std(target) / std(prediction) over the training transitions: the
    Q-head's values then spread as much as the value head's, and the same VAS / CD beta means
    about the same with tree-forward values and Q-head values. The state value
    V(s) is not modelled: VAS and CD centre the values over the candidates, where it cancels.
    """

    def __init__(self, dim: int, rank: int = 64, pool: str = "none") -> None:
        super().__init__()
        self.pool = _check_pool(pool)
        in_dim = pool_width(dim, pool)
        self.register_buffer("mu", torch.zeros(in_dim))
        self.register_buffer("sigma", torch.ones(in_dim))
        self.register_buffer("r_mean", torch.zeros(()))
        self.register_buffer("r_std", torch.ones(()))
        self.register_buffer("scale", torch.ones(()))
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        self.token = nn.Parameter(torch.zeros(dim))
        nn.init.zeros_(self.up.weight)  # starts at zero advantage everywhere

    def query(self, h: Tensor) -> Tensor:
        """[..., D] hidden states ([..., 2D] with ``pool="mean"``) -> [..., D] query vectors
        (dot them with token embeddings)."""
        x = (h.float() - self.mu) / self.sigma
        return self.up(self.down(x)) + self.token

    def forward(self, h: Tensor, embed_rows: Tensor) -> Tensor:
        """Advantages in reward stds (fp32).

        Args:
            h: [N, D] hidden states of N prefixes ([N, 2D] features with ``pool="mean"``).
            embed_rows: [N, k, D] embeddings of each prefix's k candidate tokens (E[ids]).
        Returns:
            [N, k] Q(s, a) - V(s), times ``scale``.
        """
        return self.scale * (embed_rows.float() @ self.query(h)[..., None]).squeeze(-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        state_dict.setdefault(prefix + "scale", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ARMHead(nn.Module):
    """Low-rank logit adapter on the base: log pi_r = log_softmax(s * l_base + E (B (A x))).

    x is the state h, or with ``pool="mean"`` [h, mean of the answer's states] (``PrefixMean``),
    so the ARM's next-token preferences can depend on what the answer already said.

    The learned prior scale ``s`` (starting at 1, i.e. the base model exactly) lets training
    discount the base model's own likelihood inside r(y) = sum_t log pi_r(y_t): with few
    preference pairs, a plain additive adapter cannot outweigh likelihood differences between
    two responses that have nothing to do with the reward.
    """

    def __init__(self, dim: int, rank: int = 32, pool: str = "none") -> None:
        super().__init__()
        self.pool = _check_pool(pool)
        self.down = nn.Linear(pool_width(dim, pool), rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        self.base_scale = nn.Parameter(torch.ones(()))
        nn.init.zeros_(self.up.weight)  # starts as the base model exactly

    def shift(self, x: Tensor) -> Tensor:
        """[N, D] states ([N, 2D] features with ``pool="mean"``) -> [N, D] adapter vectors u;
        the adapter's logits are u E^T."""
        return self.up(self.down(x.float()))

    def delta(self, x: Tensor, embed: Tensor) -> Tensor:
        """[N, D or 2D] -> [N, V'] adapter logits over the rows of ``embed`` [V', D]."""
        return self.shift(x) @ embed.float().T

    def logprobs(self, x: Tensor, base_logits: Tensor, embed: Tensor) -> Tensor:
        """log pi_r [N, V]: ``x`` the adapter's input (the state, or pooled features),
        ``base_logits`` [N, V] the base's logits at the same prefixes."""
        return torch.log_softmax(self.base_scale * base_logits.float() + self.delta(x, embed),
                                 dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # heads saved before the prior scale existed load with s = 1 (what they were trained as)
        state_dict.setdefault(prefix + "base_scale", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass
class Head:
    """A loaded head: its manifest and module."""

    name: str
    kind: str  # "value", "q" or "arm"
    module: nn.Module
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def runner(self) -> str:
        """Which model's hidden states the head reads: "base" or "backbone-L"; "tokens" for a
        lexical value head, which reads the answer's token ids only, and for a lexical ARM,
        which reads the base's logits only (``lexical.py``)."""
        placement = self.manifest.get("placement")
        if placement == "tokens":
            return "tokens"
        layers = self.manifest.get("arch", {}).get("layers")
        return f"backbone-{layers}" if placement == "backbone" else "base"

    @property
    def info(self) -> RewardInfo:
        m = self.manifest
        desc = m.get("description") or f"{self.kind} head approximating {m.get('reward', '?')}"
        wr = tuple(m.get("weight_range", (0.0, 5.0) if self.kind == "arm" else (-20.0, 20.0)))
        if self.kind == "arm":  # GenARM refuses negative weights (decoders/genarm.py)
            wr = (max(0.0, wr[0]), wr[1])
        kind = {"value": "value_head", "q": "q_head"}.get(self.kind, "arm")
        return RewardInfo(name=self.name, kind=kind,
                          description=desc, range=tuple(m.get("range", (-1e9, 1e9))),
                          weight_range=wr)  # type: ignore[arg-type]

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the head's ``head.safetensors`` (None for a head not loaded from disk);
        a Q-head's manifest records its value head's, so the pair is matched by content."""
        if self.path is None:
            return None
        if not hasattr(self, "_sha"):
            self._sha = hashlib.sha256((Path(self.path) / WEIGHTS).read_bytes()).hexdigest()
        return self._sha

    @property
    def reward_stats(self) -> dict[str, float]:
        """Mean and std of the reward over the base's samples; a value head's output unit is
        one std (old manifests without them: mean 0, std 1, i.e. raw reward units)."""
        st = self.manifest.get("reward_stats") or {}
        return {"mean": float(st.get("mean", 0.0)), "std": float(st.get("std", 1.0))}

    def describe(self) -> dict[str, Any]:
        """The head as ``GET /v1/heads`` shows it: name, kind, reward, weight range, metrics,
        reward statistics and training settings, without the per-epoch history and without
        the training machine's paths and command line (``PRIVATE_TRAINING_KEYS``; they stay
        in ``manifest.json``)."""
        m = self.manifest
        return {"name": self.name, "kind": self.info.kind, "description": self.info.description,
                "reward": m.get("reward"), "placement": m.get("placement", "base"),
                "weight_range": list(self.info.weight_range),
                "pool": m.get("arch", {}).get("pool", "none"), "metrics": m.get("metrics", {}),
                "reward_stats": self.reward_stats,
                "training": {k: v for k, v in m.get("training", {}).items()
                             if k not in PRIVATE_TRAINING_KEYS}}


def _check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise HeadError(f"unknown pool {pool!r} (expected one of {POOLS})")
    return pool


def build_module(kind: str, arch: dict[str, Any]) -> nn.Module:
    pool = arch.get("pool", "none")
    if pool != "none" and arch.get("layers"):
        raise HeadError(f"pool={pool!r} is for heads on the base's states only")
    if kind == "value" and "lexical" in arch:
        from .lexical import LexicalValueHead

        lex = arch["lexical"]
        return LexicalValueHead(lex["vocab"], lex["features"], arch.get("hidden", 64))
    if kind == "value":
        return ValueHead(arch["dim"], arch.get("hidden", 128), pool)
    if kind == "arm" and "lexical" in arch:
        from .lexical import LexicalARM

        lex = arch["lexical"]
        try:
            return LexicalARM(lex["vocab"], lex["features"], arch.get("hidden", 16),
                              arch.get("reward_form", "increment"), arch.get("positions", 0),
                              arch.get("horizon", 0))
        except ValueError as exc:
            raise HeadError(f"arch: {exc}") from exc
    if kind == "arm":
        return ARMHead(arch["dim"], arch.get("rank", 32), pool)
    if kind == "q":
        return QHead(arch["dim"], arch.get("rank", 64), pool)
    raise HeadError(f"unknown head kind {kind!r} (expected 'value', 'q' or 'arm')")


def _strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, so the manifest is
    strict JSON (``null``: the metric is undefined) that any JSON reader accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def save_head(folder: Path, head: Head) -> Path:
    """Write ``manifest.json`` + ``head.safetensors`` (tensors made contiguous, fp32).

    Non-finite floats in the manifest (an undefined metric) are written as ``null``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in head.module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    lexicon = getattr(head.module, "lexicon", None)
    if lexicon is not None:  # a lexical head's whole-word features (lexical.Lexicon)
        from .lexical import LEXICON

        (folder / LEXICON).write_text(json.dumps(lexicon.to_json(), ensure_ascii=False))
    manifest = {"format": FORMAT_VERSION, "name": head.name, "kind": head.kind,
                **{k: v for k, v in head.manifest.items() if k not in ("name", "kind")}}
    text = json.dumps(_strict_json(manifest), indent=2, sort_keys=True, allow_nan=False)
    (folder / MANIFEST).write_text(text + "\n")
    # safetensors writes owner-only files: give the weights the manifest's (umask) mode, so a
    # server running as another user can read the head
    (folder / WEIGHTS).chmod((folder / MANIFEST).stat().st_mode & 0o777)
    head.path = folder
    return folder


def load_head(folder: Path, fingerprint: str | None = None, dim: int | None = None) -> Head:
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HeadError(f"{folder}: unreadable {MANIFEST}: {exc}") from None
    for key in ("name", "kind", "arch", "tokenizer"):
        if key not in manifest:
            raise HeadError(f"{folder}: {MANIFEST} lacks '{key}'")
    if fingerprint is not None and manifest["tokenizer"] != fingerprint:
        raise HeadError(f"head '{manifest['name']}' in {folder} was built for tokenizer "
                        f"{manifest['tokenizer']}, but the served model's is {fingerprint}; "
                        "retrain it for this model")
    if dim is not None and manifest["arch"].get("dim") != dim \
            and "lexical" not in manifest["arch"]:  # lexical heads read token ids, not states
        raise HeadError(f"head '{manifest['name']}' expects hidden size "
                        f"{manifest['arch'].get('dim')}, the model has {dim}")
    module = build_module(manifest["kind"], manifest["arch"])
    if not (folder / WEIGHTS).is_file():
        raise HeadError(f"{folder}: {WEIGHTS} is missing (copy the whole head folder)")
    try:
        module.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (OSError, RuntimeError) as exc:
        raise HeadError(f"{folder}: weights do not match the manifest: {exc}") from None
    from .lexical import LEXICON, Lexicon

    if (manifest["arch"].get("lexical", {}).get("lexicon_words")
            and not (folder / LEXICON).is_file()):
        raise HeadError(f"{folder}: the manifest names a lexicon of "
                        f"{manifest['arch']['lexical']['lexicon_words']} words but {LEXICON} is "
                        "missing (copy the whole head folder)")
    if hasattr(module, "lexicon") and (folder / LEXICON).is_file():
        try:
            module.lexicon = Lexicon.from_json(json.loads((folder / LEXICON).read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise HeadError(f"{folder}: unreadable {LEXICON}: {exc}") from None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return Head(manifest["name"], manifest["kind"], module, manifest, folder)


def default_heads_dir() -> Path:
    """The heads shipped inside the package for the default model (``alignserve train all``
    rebuilds them); ``alignserve serve`` loads them unless ``--no-default-heads``."""
    import importlib.resources

    return Path(str(importlib.resources.files("alignserve.value_models").joinpath(
        "default_heads")))


def check_heads_folder(root: str | Path) -> Path:
    """``root`` as a Path; HeadError when it is not a folder (missing, or a file)."""
    root = Path(root)
    if not root.is_dir():
        raise HeadError(f"--heads {root}: "
                        f"{'not a folder' if root.exists() else 'no such folder'}")
    return root


def load_heads(root: Path, fingerprint: str | None = None, dim: int | None = None) -> list[Head]:
    """Every head in ``root`` (the folder itself or its sub-folders holding a manifest)."""
    root = check_heads_folder(root)
    folders = [root] if (root / MANIFEST).is_file() else sorted(
        p.parent for p in root.glob(f"*/{MANIFEST}"))
    if not folders:
        log.warning("--heads %s holds no head (no %s in it or in a sub-folder)", root, MANIFEST)
    heads = [load_head(f, fingerprint, dim) for f in folders]
    names = [h.name for h in heads]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise HeadError(f"--heads {root}: duplicate head names {sorted(dup)}")
    return heads
