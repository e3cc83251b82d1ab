"""Train guidance heads (value heads, ARMs) on the frozen base model's own samples.

Pipeline (``alignserve train value|arm``):

1. **Samples.** K continuations per train prompt are drawn from the frozen base through the
   :class:`~alignserve.engine.scheduler.Engine` (chat template, temperature 1.0, top-p 0.95, one
   fixed seed per prompt derived from ``--seed`` and the prompt id), so the heads learn about
   exactly the distribution the server samples from. Every request is submitted at once, so the
   engine decodes ``--slots`` rows (128 for ``train all``) in every step. Sampling is by far the
   slow part, so the samples are cached under ``<run-dir>/samples/<key>/`` and written in
   chunks: an interrupted run resumes where it stopped, a run on N prompts reuses a cache of
   more (prompts come in a fixed hash order), and heads for different rewards share one cache
   (only the cheap reward scoring is redone per reward).
2. **Features.** The sampling forwards themselves keep the final hidden state at the last
   prompt token (the empty-prefix state s_0) and after every response token (s_1..s_T), plus
   the base's top-64 log-probs at s_0..s_{T-1} (ARM training's candidate set). A response that
   ended with EOS keeps the EOS token, because whether to stop is part of what a length or tone
   objective has to learn. Heads read exactly these states at decode time (placement ``base``),
   so training never runs the transformer again. (Backbone heads run one more forward of the
   base's first L layers over prompt + response.)
3. **Training** on the cached states only (seconds to minutes on a CPU):

   * Rewards are standardised by their mean and standard deviation over the train samples
     (stored as the head's ``reward_stats``): value heads predict the reward in reward standard
     deviations, so a VAS / CD beta means "logits per reward std" for every reward, and the ARM
     pair margin is in stds.
   * value heads: ``fudge`` regresses V(s_t) on the final reward r at every prefix;
     ``td-lambda`` regresses on lambda-returns (gamma = 1, reward only at the end) bootstrapped
     from the head's own values; ``cd-q`` regresses on V(s_{t+1}) along the sampled path (the
     one-sample Monte-Carlo estimate of sum_a pi_base(a) V([x, y<t, a])), with V(s_T) -> r.
     The empty-prefix state s_0, shared by the K samples of a prompt, regresses on their mean
     reward (the K-sample Monte-Carlo value). Bootstrapped targets are recomputed from the
     current head every ``--refresh-every`` optimizer steps (0 = once per epoch), always with
     stop-gradient.
   * ARMs: preference pairs from the K samples of each prompt ranked by reward (near-ties below
     ``--margin`` reward stds skipped), GenARM loss
     ``-log sigmoid(beta_r (sum_t log pi_r(y_w,t) - sum_t log pi_r(y_l,t)))`` with
     ``log pi_r = ARMHead.logprobs(h, h @ E.T, E)``, E the tied embedding matrix. With the
     recorded candidates the softmax is normalised over the base's top-64 tokens, y_t and the
     remaining tail at its base mass (a sampled softmax, about 700x cheaper than the vocabulary
     matmul; the prior scale s stays 1 so the tail term is exact for the base); held-out
     accuracy is always measured with the full vocabulary.

4. **Report** on validation prompts (never ``test``): Spearman rho between V(prefix) at 25/50/75%
   of the response and the final reward, plus MSE, for value heads; held-out pairwise accuracy
   for ARMs. Metrics, every setting and the exact command line go into the head manifest.

Reproducibility: ``--seed`` fixes the sampling seeds, the head initialisation and the data order
(permutations come from a generator seeded by (seed, epoch)), so two runs give bit-identical
weights. Checkpoints are written after every epoch; ``--resume`` continues from the last one and
reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..progress import progress_bar
from .heads import (
    POOLS,
    ARMHead,
    Head,
    QHead,
    ValueHead,
    save_head,
    tokenizer_fingerprint,
)
from .lexical import LexicalARM, Lexicon, contextual_rows, token_windows

CACHE_VERSION = 2
MAX_SAMPLE_TOKENS = 1024  # --max-new-tokens: the sampling KV cache is slots x this x layers
HEAD_NAME = re.compile(r"[^\s/\\.][^\s/\\]{0,99}")  # a plain name: no path, no space
VALUE_METHODS = ("td-lambda", "fudge", "cd-q")
FRACTIONS = (0.25, 0.5, 0.75)
TOPK = 64  # base log-probs kept per state while sampling (ARM training's candidate set)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every setting of a training run; the whole object is stored in the head manifest."""

    kind: str  # "value", "q" or "arm"
    reward: str  # "name", "a,b" or "a=1,b=0.5"
    out: str
    name: str | None = None
    method: str = "td-lambda"  # value heads only
    model: str = "default"
    suite: str = "mixed"
    prompts: int | None = 120  # train prompts (deterministic subsample); None = all
    val_prompts: int | None = 40
    samples: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    epochs: int | None = None  # None: 10 for value heads, 2 for ARMs
    lr: float | None = None  # None: 1e-3 for value heads, 5e-4 for ARMs
    batch_size: int | None = None  # None: 256 positions (value), 32 pairs (arm)
    weight_decay: float = 0.0
    hidden: int = 128
    pool: str = "none"  # value heads, ARMs: "mean" reads [h_t, mean(h_0..h_t)] (Q: their V's)
    backbone_layers: int = 0  # 0: read the base's final states; L: a backbone of its first L
    lexical: bool = False  # value heads / ARMs: per-token features of the reward (lexical.py)
    arm_reward: str | None = None  # lexical ARMs: "token" (None: the default) or "increment"
    positions: int = 0  # lexical ARMs: > 0 reads a bucket of the feature sum so far (LexicalARM)
    end_pairs: int = 0  # positional ARMs: > 0 pairs each answer with its every N-th prefix, ended
    word_fit_alpha: float | None = None  # fitted lexical featurizers: ridge alpha (None: CV)
    featurizer: str | None = None  # lexical heads: None = the reward's (FEATURIZER_FOR_REWARD)
    rank: int = 32
    lam: float | None = None  # td-lambda value heads: None = 0.95
    aux_partial: float = 0.0  # value heads: weight of the partial-text reward auxiliary loss
    aux_every: int | None = None  # ... scored at every aux_every-th state (None: 4)
    refresh_every: int | None = None  # None: 0 (per epoch) for td-lambda, 4 steps for cd-q
    beta_r: float = 0.05
    margin: float = 0.1
    value_head: str | None = None  # q heads: the value head distilled (None: <reward>_value)
    run_dir: str = "runs/train"
    resume: bool = False
    device: str = "cpu"
    threads: int | None = None
    slots: int = 64
    progress: bool = True
    command: str = field(default_factory=lambda: shlex.join(["alignserve", *sys.argv[1:]]))

    def lexical_featurizer(self) -> str:
        """A lexical head's featurizer: ``featurizer``, else the reward's own
        (``lexical.FEATURIZER_FOR_REWARD``). ValueError for an unknown one."""
        from .lexical import FEATURIZERS, FITTED_FEATURIZERS, featurizer_for

        weights = parse_reward_spec(self.reward)
        if self.featurizer is None:
            name = featurizer_for(weights)  # exactly one reward, which has a featurizer
        elif len([n for n, w in weights.items() if w]) != 1:
            raise ValueError("--lexical needs exactly one reward (its feature sum is the "
                             f"head's input); got {self.reward!r}")
        else:
            name = self.featurizer
        known = sorted([*FEATURIZERS, *FITTED_FEATURIZERS])
        if name not in known:
            raise ValueError(f"--featurizer must be one of {known}, got {name!r}")
        return name

    def resolved(self) -> TrainConfig:
        """Fill method-dependent defaults so the manifest records the values actually used."""
        value = self.kind in ("value", "q")
        if self.kind not in ("value", "q", "arm"):
            raise ValueError(f"kind must be 'value', 'q' or 'arm', got {self.kind!r}")
        if value and self.method not in VALUE_METHODS:
            raise ValueError(f"--method must be one of {VALUE_METHODS}, got {self.method!r}")
        if (self.aux_every is not None and self.aux_every < 1) or not (
                math.isfinite(self.aux_partial) and self.aux_partial >= 0):
            raise ValueError(f"--aux-every must be >= 1 and --aux-partial finite and >= 0, "
                             f"got {self.aux_every} and {self.aux_partial}")
        # a setting the head would not use is refused, not silently recorded in its manifest
        td = self.kind == "value" and self.method == "td-lambda"
        if self.lam is not None and not td:
            raise ValueError(f"--lam is the lambda of td-lambda value heads' returns; this "
                             f"head is a {self.kind} head" + (
                                 f" with --method {self.method}" if self.kind == "value"
                                 else ""))
        if self.refresh_every is not None and not (
                self.kind == "value" and self.method in ("td-lambda", "cd-q")):
            raise ValueError("--refresh-every is for value heads with bootstrapped targets "
                             "(--method td-lambda or cd-q)")
        if self.aux_partial and self.kind != "value":
            raise ValueError("--aux-partial is for value heads")
        if self.aux_every is not None and not self.aux_partial:
            raise ValueError("--aux-every sets how often --aux-partial scores the partial "
                             "text: it needs --aux-partial > 0")
        if self.pool not in POOLS:
            raise ValueError(f"--pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool != "none" and (self.kind == "q" or self.backbone_layers):
            raise ValueError("--pool is for value heads and ARMs on the base's states (a "
                             "Q-head takes its value head's)")
        from .rewards import default_rewards

        # names only (nothing is loaded here), before sampling, which would run for minutes
        refuse_unknown_rewards(parse_reward_spec(self.reward), {*default_rewards(), "judge"})
        if self.arm_reward is not None and self.arm_reward not in LexicalARM.REWARD_FORMS:
            raise ValueError(f"--arm-reward must be one of {LexicalARM.REWARD_FORMS}, got "
                             f"{self.arm_reward!r}")
        if self.arm_reward is not None and not (self.kind == "arm" and self.lexical):
            raise ValueError("--arm-reward is for lexical ARMs (train arm --lexical): an ARM "
                             "on model states defines its reward by its own log-probs")
        if self.positions and not (self.kind == "arm" and self.lexical):
            raise ValueError("--positions is for lexical ARMs (train arm --lexical)")
        if self.positions and self.arm_reward == "increment":
            raise ValueError("--positions needs --arm-reward token (a positional ARM is "
                             "trained as a per-token reward)")
        if self.end_pairs < 0:
            raise ValueError(f"--end-pairs must be >= 0, got {self.end_pairs}")
        if self.end_pairs and not self.positions:
            raise ValueError("--end-pairs teaches a positional lexical ARM when ending pays "
                             "(it needs --positions P > 0)")
        if self.end_pairs >= self.max_new_tokens > 0:
            raise ValueError(f"--end-pairs must be below --max-new-tokens "
                             f"({self.max_new_tokens}): it cuts the answers every N tokens, so "
                             f"{self.end_pairs} would cut none")
        if not 0 <= self.positions <= LexicalARM.MAX_POSITIONS:
            raise ValueError(f"--positions must be from 0 to {LexicalARM.MAX_POSITIONS}, got "
                             f"{self.positions}")
        if (self.featurizer is not None or self.word_fit_alpha is not None) and not self.lexical:
            raise ValueError("--featurizer and --word-fit-alpha are for lexical heads "
                             "(--lexical)")
        if self.lexical:
            if self.kind == "q":
                raise ValueError("--lexical is for value heads and ARMs (a lexical value head "
                                 "values every candidate itself: it needs no Q-head)")
            if self.pool != "none" or self.backbone_layers:
                raise ValueError("--lexical reads token ids, not model states: it takes no "
                                 "--pool or --backbone-layers")
            from .lexical import COUNT_FEATURIZERS, FITTED_FEATURIZERS

            fitted = self.lexical_featurizer() in FITTED_FEATURIZERS
            if self.positions and self.lexical_featurizer() not in COUNT_FEATURIZERS:
                raise ValueError(f"--positions buckets a count of the answer so far (the "
                                 f"feature sum), so it takes a counting featurizer "
                                 f"{list(COUNT_FEATURIZERS)}; this head's is "
                                 f"{self.lexical_featurizer()!r}")
            if self.word_fit_alpha is not None and not fitted:
                raise ValueError(f"--word-fit-alpha is for a featurizer fitted to the reward "
                                 f"({sorted(FITTED_FEATURIZERS)}); this head's is "
                                 f"{self.lexical_featurizer()!r}")
            if self.word_fit_alpha is not None and not (
                    math.isfinite(self.word_fit_alpha) and self.word_fit_alpha > 0):
                raise ValueError("--word-fit-alpha must be finite and > 0, got "
                                 f"{self.word_fit_alpha}")
            if fitted and self.prompts is not None and self.prompts < 4:
                raise ValueError(f"--prompts must be >= 4 for a lexical {self.reward} head: its "
                                 "word scores are fitted with prompt-grouped 4-fold "
                                 f"cross-validation, got {self.prompts}")
        # checked here, before any sampling: each would otherwise fail minutes (or an hour) in
        for flag, v, lo in (("--samples", self.samples, 1), ("--max-new-tokens",
                            self.max_new_tokens, 1), ("--prompts", self.prompts, 1),
                            ("--val-prompts", self.val_prompts, 0),
                            ("--backbone-layers", self.backbone_layers, 0)):
            if v is not None and v < lo:
                every = " (or 0 for all)" if flag == "--prompts" else ""
                raise ValueError(f"{flag} must be >= {lo}{every}, got {v}")
        if self.kind == "arm" and self.samples < 2:
            raise ValueError(f"--samples must be >= 2 for an ARM: it learns from pairs of "
                             f"answers to one prompt, got {self.samples}")
        if self.slots < self.samples + 1:
            raise ValueError(f"--slots {self.slots} is too few for --samples {self.samples}: "
                             "sampling and featurising hold a prompt's prefix and its samples "
                             f"at once; use --slots >= {self.samples + 1} (default 64)")
        out = TrainConfig(**asdict(self))
        out.name = self.name if self.name is not None else Path(self.out).name  # "": refused
        out.epochs = self.epochs if self.epochs is not None else (10 if value else 2)
        out.lr = self.lr if self.lr is not None else (1e-3 if value else 5e-4)
        out.batch_size = self.batch_size if self.batch_size is not None else (256 if value else 32)
        if self.refresh_every is None and self.kind == "value" and self.method != "fudge":
            out.refresh_every = 4 if self.method == "cd-q" else 0
        if td and self.lam is None:
            out.lam = 0.95
        if self.aux_partial and self.aux_every is None:
            out.aux_every = 4
        if not value:
            out.method = "genarm"
        if self.kind == "q":
            out.method = "distill-v"
        if self.kind == "arm" and self.lexical and self.arm_reward is None:
            out.arm_reward = "token"
        out.check_ranges()
        return out

    def check_ranges(self) -> None:
        """Refuse out-of-range numbers, paths and names before any sampling (each would
        otherwise crash, be ignored, or save a useless head minutes later). ValueError naming
        the flag, the allowed range and the value."""
        fin = math.isfinite
        for flag, v, ok, want in (
                ("--max-new-tokens", self.max_new_tokens, self.max_new_tokens
                 <= MAX_SAMPLE_TOKENS, f"from 1 to {MAX_SAMPLE_TOKENS}"),
                ("--temperature", self.temperature, fin(self.temperature)
                 and self.temperature > 0, "finite and > 0"),
                ("--top-p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
                ("--epochs", self.epochs, (self.epochs or 0) >= 1, ">= 1"),
                ("--lr", self.lr, fin(self.lr or 0) and (self.lr or 0) > 0, "finite and > 0"),
                ("--batch-size", self.batch_size, (self.batch_size or 0) >= 1, ">= 1"),
                ("--weight-decay", self.weight_decay, fin(self.weight_decay)
                 and self.weight_decay >= 0, "finite and >= 0"),
                ("--hidden", self.hidden, self.hidden >= 1, ">= 1"),
                ("--rank", self.rank, self.rank >= 1, ">= 1"),
                ("--lam", self.lam, self.lam is None or 0 <= self.lam <= 1, "in [0, 1]"),
                ("--beta-r", self.beta_r, fin(self.beta_r) and self.beta_r > 0,
                 "finite and > 0"),
                ("--margin", self.margin, fin(self.margin) and self.margin >= 0,
                 "finite and >= 0"),
                ("--slots", self.slots, self.slots >= 1, ">= 1"),
                ("--refresh-every", self.refresh_every, (self.refresh_every or 0) >= 0,
                 ">= 0 (0 = once per epoch)"),
                ("--threads", self.threads, self.threads is None or self.threads >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"{flag} must be {want}, got {v}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: this torch build sees no CUDA device "
                             f"(torch {torch.__version__}); use --device cpu")
        if not HEAD_NAME.fullmatch(self.name or ""):
            raise ValueError(f"--name must be a plain name of 1-100 characters: no '/', '\\' "
                             f"or spaces, not starting with '.' (clients weight it by name), "
                             f"got {self.name!r}")
        for flag, path in (("--out", Path(self.out)), ("--run-dir", Path(self.run_dir))):
            check_folder_path(flag, path)


def check_folder_path(flag: str, path: Path) -> None:
    """ValueError naming ``flag`` when ``path`` or a folder above it exists as a file (the
    folder could never be made); a path that does not exist yet is fine."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f" ({p} is a file)"
                raise ValueError(f"{flag} {path} is not a folder{where}")
            return


def parse_reward_spec(spec: str) -> dict[str, float]:
    """``"a,b=0.5"`` -> ``{"a": 1.0, "b": 0.5}``; names summed with their weights."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition("=")
        try:
            weights[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"bad reward weight in {part!r} (expected name=number)") from None
    if not weights:
        raise ValueError("--reward names no reward source")
    return weights


# --------------------------------------------------------------------------------------------
# prompts and samples
# --------------------------------------------------------------------------------------------

def _stable_int(*parts: Any) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:6], "little")


def select_prompts(split: str, suite: str, n: int | None) -> list[Any]:
    """The first ``n`` prompts of ``split`` in hash order of their ids.

    Ordering by a hash of the id (not by a seeded shuffle) makes the subsample independent of
    ``--seed`` and of ``n``: 60 prompts are a prefix of 120, so caches and runs stay comparable.
    """
    from alignserve.data.prompts import load_prompts

    prompts = sorted(load_prompts(split, suite),
                     key=lambda p: hashlib.sha256(p.id.encode()).hexdigest())
    return prompts if n is None else prompts[:n]


class BaseModel:
    """The frozen base, loaded lazily: a full engine only when sampling or features are needed."""

    def __init__(self, model: str, device: str, slots: int, threads: int | None) -> None:
        import os

        from alignserve.engine.model_store import resolve_model

        if model == "default":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model_dir = resolve_model(None if model == "default" else model, progress=False)
        self.device = device
        self.slots = slots
        self.threads = threads
        self.max_len = 256  # raised by ``ensure_len`` before the engine is built
        self._engine: Any = None
        self._tokenizer: Any = None
        self._embed: Tensor | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return self._tokenizer

    def ensure_len(self, tokens: int) -> None:
        """Make room for ``tokens`` positions; the KV cache is sized to what the data needs
        (slots x max_len x layers), rebuilding the engine if it was built smaller."""
        need = -(-tokens // 64) * 64
        if need > self.max_len:
            self.max_len = need
            self.close()

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from alignserve.engine.scheduler import Engine, EngineConfig

            self._engine = Engine(EngineConfig(model_dir=self.model_dir, slots=self.slots,
                                               max_len=self.max_len, max_waiting=1_000_000,
                                               request_timeout_s=1e9, device=self.device,
                                               threads=self.threads))
        return self._engine

    @property
    def embed(self) -> Tensor:
        """The tied embedding / LM-head matrix E [V, D] in fp32 (no gradient)."""
        if self._embed is None:
            if self._engine is not None:
                w = self._engine.base.model.head_weight
            else:
                from alignserve.engine.model import load_causal_lm

                w = load_causal_lm(self.model_dir, max_len=16)[0].head_weight
            self._embed = w.detach().float().to(self.device)
        return self._embed

    def eos_id(self) -> int:
        ids = self.engine.eos_ids
        tid = self.tokenizer.eos_token_id
        return int(tid) if tid in ids or not ids else int(min(ids))

    def check_backbone_layers(self, layers: int) -> None:
        """Raise ValueError naming ``--backbone-layers`` unless 0 <= layers <= the base's."""
        from alignserve.engine.model import ModelConfig

        n = ModelConfig.from_hf(json.loads((Path(self.model_dir) / "config.json").read_text())
                                ).num_layers
        if not 0 <= layers <= n:
            raise ValueError(f"--backbone-layers must be from 0 (the base's final states) to "
                             f"{n} (its layers), got {layers}")

    def backbone(self, layers: int) -> Any:
        """A runner over the base's first ``layers`` layers (own KV cache), for backbone heads."""
        from alignserve.engine.runner import ModelRunner

        key = (layers, self.max_len)
        if getattr(self, "_backbone_key", None) != key:
            self._backbone = ModelRunner(f"backbone-{layers}", self.model_dir, slots=self.slots,
                                         max_len=self.max_len, device=self.device,
                                         num_layers=layers)
            self._backbone_key = key
        return self._backbone

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Chat-formatted prompt ids exactly as the server builds them (one user turn)."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(chat, add_special_tokens=False)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:80]


def cache_dir(cfg: TrainConfig, split: str) -> Path:
    """Sample cache folder: depends on everything that changes the samples, not on the reward
    and not on the number of prompts (prompts come in a fixed order, so a cache of 120 prompts
    serves a run on 60, and a run on 120 extends a cache of 60)."""
    model = "default" if cfg.model == "default" else _slug(Path(cfg.model).name)
    key = (f"{model}-{cfg.suite}-{split}-k{cfg.samples}-t{cfg.max_new_tokens}"
           f"-T{cfg.temperature:g}-p{cfg.top_p:g}-s{cfg.seed}")
    return Path(cfg.run_dir) / "samples" / key


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def nucleus_sample(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator,
                   k: int = 1024) -> tuple[Tensor, Tensor]:
    """Temperature + top-p sampling of one token per row of ``logits`` [R, V].

    Returns (tokens [R] long, base log-probabilities of those tokens [R] at temperature 1).
    The nucleus is found within the top ``k`` tokens (a partial sort, several times cheaper than
    sorting the vocabulary on a CPU); rows whose top ``k`` hold less than ``top_p`` of the mass
    fall back to the full sort, so the distribution is exactly the nucleus one. One uniform
    draw per row from ``gen`` (the request's generator) makes the result independent of which
    other requests share the batch.
    """
    lf = logits.float()
    probs = torch.softmax(lf / max(temperature, 1e-5), dim=-1)
    vals, idx = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
    short = vals.sum(-1) < top_p
    if bool(short.any()):
        full_v, full_i = torch.sort(probs[short], dim=-1, descending=True)
        pad = probs.shape[-1] - vals.shape[-1]
        vals = F.pad(vals, (0, pad))
        idx = F.pad(idx, (0, pad))
        vals[short], idx[short] = full_v, full_i
    keep = (vals.cumsum(-1) - vals) < top_p  # the smallest prefix whose mass reaches top_p
    w = vals * keep
    cum = w.cumsum(-1)
    u = torch.rand(len(w), generator=gen) * cum[:, -1]
    pos = torch.searchsorted(cum, u[:, None]).clamp_max(w.shape[-1] - 1)
    pos = torch.minimum(pos, keep.sum(-1, keepdim=True) - 1)
    tokens = idx.gather(1, pos)[:, 0]
    base_lp = torch.log_softmax(lf, dim=-1).gather(1, tokens[:, None])[:, 0]
    return tokens, base_lp


class _RecordingSample:
    """Plain sampling from the base (temperature + top-p with :func:`nucleus_sample`, one
    generator per request) that also keeps the final hidden state after every sampled token, so
    the features come out of the sampling forwards themselves instead of a second pass over
    every response.

    ``hidden[c]`` is [T_c + 1, D] float32 for choice c: s_0 (last prompt token), then the state
    after each emitted token, the stopping EOS included (one extra one-token forward per row).
    """

    def __new__(cls, *a: Any, **kw: Any) -> Any:  # built lazily: keeps engine imports local
        from alignserve.decoders.base import Decoder, emit_rows, prefill
        from alignserve.engine.primitives import Extend

        class Recording(Decoder):
            name = "sample"

            def __init__(self) -> None:
                super().__init__({})
                self.hidden: list[list[Tensor]] = []
                self.top: list[list[tuple[Tensor, Tensor]]] = []
                self.sampled: list[list[int]] = []

            @staticmethod
            def topk(logits: Tensor) -> list[tuple[Tensor, Tensor]]:
                lp = torch.log_softmax(logits.float(), dim=-1)
                v, i = torch.topk(lp, TOPK, dim=-1)
                return [(a.half(), b.int()) for a, b in zip(v.cpu(), i.cpu())]

            def run(self, ctx: Any) -> Any:
                seq, last = yield from prefill(ctx, False)
                n = ctx.n
                h0 = ctx.prompt_hidden.detach().float().cpu()
                self.hidden = [[h0] for _ in range(n)]
                top0 = self.topk(last[None])[0]
                self.top = [[top0] for _ in range(n)]
                self.sampled = [[] for _ in range(n)]
                seqs = [seq] + ctx.fork(seq, n - 1)
                gen = ctx.generator(0)
                logits = last[None].expand(n, -1)
                live = list(range(n))
                p = ctx.params
                while live:
                    tokens, base_lp = nucleus_sample(logits, p.temperature, p.top_p, gen)
                    ctx.stats.tokens_generated += len(live)
                    done = emit_rows(ctx, live, tokens, base_lp, None)
                    toks = tokens.tolist()
                    for i, t in zip(live, toks):
                        self.sampled[i].append(int(t))
                    # every row extends by its token (finished ones too, for the state after
                    # their last token); only the unfinished rows' logits are used next
                    outs = yield [Extend(seqs[i], [t], hidden=True) for i, t in zip(live, toks)]
                    for i, o in zip(live, outs):
                        self.hidden[i].append(o.hidden[-1].detach().float().cpu())
                        self.top[i].append(self.topk(o.logits[-1:])[0])
                    keep = [j for j, d in enumerate(done) if not d]
                    if not keep:
                        return
                    logits = torch.cat([outs[j].logits for j in keep])
                    live = [live[j] for j in keep]

        return Recording()


def sample_responses(base: BaseModel, cfg: TrainConfig, prompts: Sequence[Any],
                     folder: Path, chunk: int = 32) -> dict[str, Any]:
    """K base samples per prompt, with their hidden states, cached in ``folder``.

    ``samples.pt`` holds the texts and tokens (rewritten after every ``chunk`` prompts);
    ``hidden-<start>.pt`` holds the states of the chunk starting at prompt ``start`` (a list of
    [T+1, D] float32 tensors, one per sample). All requests are submitted at once, so the engine
    keeps ``--slots`` rows (``slots / K`` prompts) decoding in one batch the whole time;
    every request has its own seed, and the engine's per-row random streams make the tokens
    independent of which requests share a batch. A killed run resumes after the last saved
    chunk.
    """
    path = folder / "samples.pt"
    data: dict[str, Any] = {"version": CACHE_VERSION, "prompts": [], "done": 0,
                            "hidden_chunks": []}
    if path.is_file():
        data = torch.load(path, weights_only=False)
        if data.get("version") != CACHE_VERSION:
            raise ValueError(f"{path}: cache from another version; delete the folder")
    todo = list(prompts)
    cached = [p["id"] for p in data["prompts"]]
    common = min(len(cached), len(todo))
    if cached[:common] != [p.id for p in todo[:common]]:
        raise ValueError(f"{path}: cached prompts differ from the selected ones (prompt set "
                         "changed?); delete the folder")
    if data["done"] >= len(todo):
        return {**data, "prompts": data["prompts"][:len(todo)], "done": len(todo)}
    from alignserve.engine.sampling import SamplingParams
    from alignserve.engine.scheduler import EngineRequest

    folder.mkdir(parents=True, exist_ok=True)
    tok = base.tokenizer
    base.ensure_len(max(len(prompt_ids(tok, p.text)) for p in todo) + cfg.max_new_tokens + 2)
    engine = base.engine
    eos = base.eos_id()
    first = data["done"]
    bar = progress_bar(total=len(todo), initial=first, desc=f"sampling {folder.name}",
                       unit="prompt", disable=not cfg.progress, mininterval=10.0, smoothing=0.05)
    events: queue.Queue = queue.Queue()
    reqs: dict[int, Any] = {}
    decs: dict[int, Any] = {}
    for i in range(first, len(todo)):
        p = todo[i]
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                max_tokens=cfg.max_new_tokens, seed=_stable_int(cfg.seed, p.id))

        def cb(ev: tuple, i: int = i) -> None:
            if ev[0] in ("done", "error"):
                events.put((i, ev))

        decs[i] = _RecordingSample()
        reqs[i] = engine.submit(EngineRequest(prompt_ids(tok, p.text), params, decoder=decs[i],
                                              n=cfg.samples, prompt_text=p.text, callback=cb))
    results: dict[int, Any] = {}
    pending_hidden: list[Tensor] = []
    pending_top: list[tuple[Tensor, Tensor]] = []
    while data["done"] < len(todo):
        i, ev = events.get()
        if ev[0] == "error":
            raise RuntimeError(f"sampling failed for prompt {todo[i].id}: {ev[1]}")
        results[i] = ev[1]
        bar.update(1)
        while data["done"] in results:
            j = data["done"]
            res, dec, p = results.pop(j), decs.pop(j), todo[j]
            toks = []
            for c, choice in enumerate(res["choices"]):
                t = list(choice["tokens"]) + ([eos] if choice["finish_reason"] == "stop" else [])
                if len(t) + 1 != len(dec.hidden[c]):
                    raise RuntimeError(f"prompt {p.id}: {len(t)} tokens but "
                                       f"{len(dec.hidden[c]) - 1} recorded states")
                toks.append(t)
                pending_hidden.append(torch.stack(dec.hidden[c]))
                # the base's top-TOPK log-probs at s_0..s_{T-1} (the states that predict a token)
                pending_top.append((torch.stack([v for v, _ in dec.top[c][:-1]]),
                                    torch.stack([i for _, i in dec.top[c][:-1]])))
            data["prompts"].append({"id": p.id, "text": p.text,
                                    "prompt_ids": list(reqs.pop(j).prompt_ids),
                                    "responses": [c["text"] for c in res["choices"]],
                                    "tokens": toks})
            data["done"] = j + 1
            chunk_start = data["hidden_chunks"][-1][1] if data["hidden_chunks"] else 0
            if data["done"] - chunk_start >= chunk or data["done"] == len(todo):
                name = f"hidden-{chunk_start:05d}.pt"
                _atomic_save(pending_hidden, folder / name)
                _atomic_save(pending_top, folder / name.replace("hidden-", "topk-"))
                pending_hidden, pending_top = [], []
                data["hidden_chunks"].append((chunk_start, data["done"], name))
                _atomic_save(data, path)
    bar.close()
    return data


def _recorded_features(data: dict[str, Any], folder: Path) -> dict[str, Tensor]:
    """Features assembled from the states recorded while sampling (see sample_responses)."""
    n = len(data["prompts"])
    rows: list[Tensor] = []
    tops: list[tuple[Tensor, Tensor]] = []
    for a, b, name in data["hidden_chunks"]:
        if a >= n:
            break
        part = torch.load(folder / name, weights_only=True)
        k = sum(len(p["tokens"]) for p in data["prompts"][a:min(b, n)])
        rows.extend(part[:k])
        tops.extend(torch.load(folder / name.replace("hidden-", "topk-"), weights_only=True)[:k])
    lengths = [len(t) + 1 for p in data["prompts"] for t in p["tokens"]]
    if len(rows) != len(lengths) or any(len(r) != m for r, m in zip(rows, lengths)):
        raise ValueError(f"{folder}: recorded states do not match the samples; delete it")
    return {
        "cand_lp": torch.cat([v for v, _ in tops]),
        "cand_ids": torch.cat([i for _, i in tops]),
        "hidden": torch.cat(rows),
        "offsets": torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.long),
        "group": torch.tensor([g for g, p in enumerate(data["prompts"]) for _ in p["tokens"]],
                              dtype=torch.long),
        "tokens": torch.tensor([x for p in data["prompts"] for t in p["tokens"] for x in t],
                               dtype=torch.long),
    }


def extract_features(base: BaseModel, data: dict[str, Any], folder: Path,
                     progress: bool = True, chunk: int = 8,
                     backbone_layers: int = 0) -> dict[str, Tensor]:
    """Final hidden states s_0..s_T of every sample, cached in ``folder/features-n<prompts>.pt``.

    ``hidden`` is [sum_s (T_s + 1), D]; sample s owns rows ``offsets[s]:offsets[s+1]``, the
    first being the state at the last prompt token. ``tokens`` holds the response tokens (flat,
    [sum_s T_s]) and ``group`` the prompt index of every sample.
    """
    if not backbone_layers and data.get("hidden_chunks"):
        return _recorded_features(data, folder)
    suffix = f"-L{backbone_layers}" if backbone_layers else ""
    path = folder / f"features-n{len(data['prompts'])}{suffix}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from alignserve.engine.primitives import Extend

    base.ensure_len(max(len(p["prompt_ids"]) + max(map(len, p["tokens"]), default=0)
                        for p in data["prompts"]) + 1)
    # the engine loop is idle (no request is running), so its runner can be driven directly
    runner = base.backbone(backbone_layers) if backbone_layers else base.engine.base
    # a prompt holds 1 + K sequences at once (its prefix and a fork per sample): never batch
    # more prompts than the runner's slots hold
    per_prompt = 1 + max((len(p["tokens"]) for p in data["prompts"]), default=0)
    if per_prompt > runner.cache.slots:
        raise ValueError(f"--slots {runner.cache.slots} is too few to featurise {per_prompt - 1} "
                         f"samples per prompt (needs at least {per_prompt})")
    chunk = max(1, min(chunk, runner.cache.slots // per_prompt))
    rows: list[Tensor] = []
    lengths: list[int] = []
    group: list[int] = []
    toks: list[int] = []
    prompts = data["prompts"]
    bar = progress_bar(total=len(prompts), desc=f"features {folder.name}", unit="prompt",
                       disable=not progress)
    for start in range(0, len(prompts), chunk):
        batch = prompts[start:start + chunk]
        seqs = [runner.new_seq() for _ in batch]
        try:
            pre = runner.run([Extend(s, p["prompt_ids"], logits="last", hidden=True)
                              for s, p in zip(seqs, batch)])
            ops, owners = [], []
            for j, (s, p) in enumerate(zip(seqs, batch)):
                nonempty = [k for k, t in enumerate(p["tokens"]) if t]
                forks = runner.fork(s, len(nonempty))
                seqs.extend(forks)
                ops += [Extend(f, p["tokens"][k], logits="all", hidden=True)
                        for f, k in zip(forks, nonempty)]
                owners += [(j, k) for k in nonempty]
            outs = runner.run(ops) if ops else []
        finally:
            for s in seqs:
                runner.free(s)
        by_key = {key: o.hidden for key, o in zip(owners, outs)}
        for j, p in enumerate(batch):
            h0 = pre[j].hidden[-1:].float().cpu()
            for k, t in enumerate(p["tokens"]):
                h = by_key.get((j, k))
                rows.append(h0 if h is None else torch.cat([h0, h.float().cpu()]))
                lengths.append(len(t) + 1)
                group.append(start + j)
                toks.extend(t)
        bar.update(len(batch))
    bar.close()
    feats = {
        "hidden": torch.cat(rows),
        "offsets": torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.long),
        "group": torch.tensor(group, dtype=torch.long),
        "tokens": torch.tensor(toks, dtype=torch.long),
    }
    _atomic_save(feats, path)
    return feats


def refuse_unknown_rewards(names: Iterable[str], known: Iterable[str]) -> None:
    """Raises ``ValueError`` naming ``--reward``, the unknown names and the known ones."""
    known = set(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown reward source(s) {unknown} in --reward; available: "
                         f"{sorted(known)}")


def score_samples(data: dict[str, Any], weights: dict[str, float], folder: Path,
                  base: BaseModel) -> Tensor:
    """Weighted sum of the reward sources per sample, cached per reward spec."""
    spec = ",".join(f"{k}={v:g}" for k, v in sorted(weights.items()))
    path = folder / f"rewards-{_slug(spec)}-n{len(data['prompts'])}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from .rewards import default_rewards

    sources = default_rewards(base.model_dir)
    refuse_unknown_rewards(weights, sources)  # a config that skipped TrainConfig.resolved()
    prompts = [p["text"] for p in data["prompts"] for _ in p["responses"]]
    responses = [r for p in data["prompts"] for r in p["responses"]]
    total = np.zeros(len(responses))
    for name, w in weights.items():
        total += w * np.asarray(sources[name].score(prompts, responses), dtype=np.float64)
    out = torch.tensor(total, dtype=torch.float32)
    _atomic_save(out, path)
    return out


def partial_rewards(data: dict[str, Any], weights: dict[str, float], folder: Path,
                    base: BaseModel, every: int, progress: bool = True) -> Tensor:
    """The reward of the *partial* response at every ``every``-th state, for an auxiliary
    target (reward distillation on partial text).

    Returns [sum_s (T_s + 1)] float32 aligned with the state rows of ``extract_features``:
    row ``offsets[s] + t`` holds the weighted reward of the first t response tokens of sample
    s (decoded to text) for t = every, 2 * every, ... < T_s, and NaN elsewhere. Cached in
    ``folder`` per reward spec; scored in batches of 512 texts with a progress bar.
    """
    spec = ",".join(f"{k}={v:g}" for k, v in sorted(weights.items()))
    path = folder / f"partial-{_slug(spec)}-e{every}-n{len(data['prompts'])}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from .rewards import default_rewards

    sources = default_rewards(base.model_dir)
    rows: list[int] = []
    prompts: list[str] = []
    texts: list[str] = []
    at = 0
    for p in data["prompts"]:
        for t in p["tokens"]:
            for cut in range(every, len(t), every):
                rows.append(at + cut)
                prompts.append(p["text"])
                texts.append(base.tokenizer.decode(t[:cut], skip_special_tokens=True))
            at += len(t) + 1
    out = torch.full((at,), float("nan"))
    total = np.zeros(len(texts))
    bar = progress_bar(total=len(texts) * len(weights), desc=f"partial-text rewards {spec}",
                       unit="text", disable=not progress)
    for name, w in weights.items():
        for a in range(0, len(texts), 512):
            total[a:a + 512] += w * np.asarray(
                sources[name].score(prompts[a:a + 512], texts[a:a + 512]), dtype=np.float64)
            bar.update(len(texts[a:a + 512]))
    bar.close()
    out[torch.tensor(rows, dtype=torch.long)] = torch.tensor(total, dtype=torch.float32)
    _atomic_save(out, path)
    return out


@dataclass
class Split:
    """Cached samples of one split: features, rewards and the raw text for inspection."""

    hidden: Tensor
    offsets: Tensor
    group: Tensor
    tokens: Tensor
    rewards: Tensor
    folder: Path
    cand_ids: Tensor | None = None  # [sum_s T_s, TOPK] the base's top token ids at s_0..s_{T-1}
    cand_lp: Tensor | None = None  # [sum_s T_s, TOPK] their base log-probs (fp16)
    partial: Tensor | None = None  # [sum_s (T_s + 1)] partial-text reward per state, NaN = none
    pooled: Tensor | None = None  # [sum_s (T_s + 1), 2D] [h_t, mean(h_0..h_t)]: a pooled ARM's
    lex_y: Tensor | None = None  # [sum_s T_s, F] a lexical ARM's feature of each response token
    lex_cand: Tensor | None = None  # [sum_s T_s, TOPK, F] ... of each recorded candidate
    lex_pos: Tensor | None = None  # [sum_s T_s] a positional lexical ARM's bucket per token
    lex_end: Tensor | None = None  # [sum_s T_s] ... and the token's end-of-text flag

    def adapter_input(self, head: Any, rows: Tensor) -> Tensor:
        """What an ARM's adapter reads at state ``rows``: the states, or pooled features."""
        if getattr(head, "pool", "none") == "none":
            return self.hidden[rows]
        if self.pooled is None:
            raise ValueError("a pool='mean' ARM needs Split.pooled (mean_pool_features)")
        return self.pooled[rows]

    @property
    def num_samples(self) -> int:
        return len(self.group)

    @property
    def lengths(self) -> Tensor:
        """Number of states per sample (T_s + 1)."""
        return self.offsets[1:] - self.offsets[:-1]


def load_split(base: BaseModel, cfg: TrainConfig, split: str, n: int | None,
               weights: dict[str, float]) -> Split:
    """Samples -> features -> rewards for one split, each step cached and resumable."""
    folder = cache_dir(cfg, split)
    prompts = select_prompts(split, cfg.suite, n)
    if not prompts:
        raise ValueError(f"no {split} prompts in suite {cfg.suite!r}")
    data = sample_responses(base, cfg, prompts, folder)
    feats = extract_features(base, data, folder, cfg.progress,
                             backbone_layers=cfg.backbone_layers)
    rewards = score_samples(data, weights, folder, base)
    partial = None
    if cfg.kind == "value" and cfg.aux_partial > 0 and split == "train":
        assert cfg.aux_every is not None  # resolved(): 4 when --aux-partial is on
        partial = partial_rewards(data, weights, folder, base, cfg.aux_every, cfg.progress)
    if cfg.kind == "arm" and cfg.end_pairs:  # the prefixes' rewards, as if ended there
        partial = partial_rewards(data, weights, folder, base, cfg.end_pairs, cfg.progress)
    return Split(feats["hidden"], feats["offsets"], feats["group"], feats["tokens"], rewards,
                 folder, feats.get("cand_ids"), feats.get("cand_lp"), partial)


# --------------------------------------------------------------------------------------------
# value heads
# --------------------------------------------------------------------------------------------

def mean_pool_features(hidden: Tensor, offsets: Tensor, chunk: int = 1024) -> Tensor:
    """[sum_s (T_s + 1), D] states -> [same, 2D] features [h_t, mean(h_0..h_t)] per sample
    (the inputs of a ``pool="mean"`` head; ``heads.PrefixMean`` builds the same ones while
    decoding). Sums run in float64 over ``chunk`` samples at a time; output float32."""
    out = torch.empty(len(hidden), 2 * hidden.shape[1], dtype=torch.float32)
    for a in range(0, len(offsets) - 1, chunk):
        lo, hi = int(offsets[a]), int(offsets[min(a + chunk, len(offsets) - 1)])
        h = hidden[lo:hi].double()
        c = torch.cumsum(h, 0)
        starts = offsets[a:a + chunk + 1] - lo
        lengths = starts[1:] - starts[:-1]
        first = torch.repeat_interleave(starts[:-1], lengths)  # each row's sample start
        step = torch.arange(hi - lo) - first
        before = torch.where((first > 0)[:, None], c[(first - 1).clamp_min(0)],
                             torch.zeros_like(c[:1]))
        out[lo:hi, :h.shape[1]] = h.float()
        out[lo:hi, h.shape[1]:] = ((c - before) / (step + 1)[:, None].double()).float()
    return out


def _position_index(split: Split) -> tuple[Tensor, Tensor, Tensor]:
    """Per state row: its sample, its step t, and whether it is the terminal state s_T."""
    lengths = split.lengths
    sample = torch.repeat_interleave(torch.arange(split.num_samples), lengths)
    step = torch.arange(len(sample)) - split.offsets[:-1][sample]
    last = step == (lengths[sample] - 1)
    return sample, step, last


@torch.no_grad()
def _predict(module: torch.nn.Module, x: Tensor, chunk: int = 8192) -> Tensor:
    return torch.cat([module(x[i:i + chunk]) for i in range(0, len(x), chunk)])


@torch.no_grad()
def value_targets(method: str, values: Tensor, split: Split, lam: float | None) -> Tensor:
    """Regression targets for every state row (stop-gradient by construction).

    ``values`` are the current head's V(s) for every row (unused by ``fudge``).
    """
    sample, step, last = _position_index(split)
    r = split.rewards[sample]
    # s_0 is the same state for the K samples of a prompt: its Monte-Carlo value is their mean
    groups = int(split.group.max()) + 1
    mc0 = torch.zeros(groups).index_add(0, split.group, split.rewards) \
        / torch.bincount(split.group, minlength=groups).clamp_min(1)
    first = step == 0
    if method == "fudge":
        return torch.where(first, mc0[split.group][sample], r)
    out = _bootstrapped_targets(method, values, split, lam, r, last)
    return torch.where(first, mc0[split.group][sample], out)


def _bootstrapped_targets(method: str, values: Tensor, split: Split, lam: float | None, r: Tensor,
                          last: Tensor) -> Tensor:
    nxt = torch.empty_like(values)
    nxt[:-1] = values[1:]
    if method == "cd-q":
        return torch.where(last, r, nxt)
    assert lam is not None, "td-lambda needs lam"
    # td-lambda, gamma = 1, reward only at the end: G_T = r,
    # G_t = (1 - lam) V(s_{t+1}) + lam G_{t+1}. Rows are padded to [samples, T_max + 1] so the
    # backward recursion is T_max vector steps instead of a loop over every row.
    sample_of, step, _ = _position_index(split)
    lengths = split.lengths
    n, width = split.num_samples, int(lengths.max())
    pad_next = torch.zeros(n, width)
    pad_next[sample_of, step] = nxt
    ret = torch.zeros(n, width)
    g = split.rewards.clone()
    for t in range(width - 1, -1, -1):
        term = lengths - 1 == t
        g = torch.where(term, split.rewards, (1 - lam) * pad_next[:, t] + lam * g)
        ret[:, t] = g
    out = ret[sample_of, step]
    return out


def value_metrics(module: torch.nn.Module, split: Split) -> dict[str, float | None]:
    """Spearman rho of V(prefix at 0/25/50/75/100% of the response) vs the final reward, MSE.
    A rho is None where it is undefined: the values at that point are all equal (a lexical
    head before the first response token)."""
    from scipy.stats import spearmanr

    v = _predict(module, split.hidden.to(next(module.parameters()).device)).cpu()
    r = split.rewards
    sample, _, _ = _position_index(split)
    out: dict[str, float | None] = {"mse": float(((v - r[sample]) ** 2).mean())}
    t_len = split.lengths - 1
    for frac in (0.0, *FRACTIONS, 1.0):
        idx = split.offsets[:-1] + torch.round(t_len.float() * frac).long()
        vals = v[idx].numpy()
        rho = spearmanr(vals, r.numpy()).statistic if np.ptp(vals) > 0 else float("nan")
        out[f"spearman_{round(frac * 100)}"] = float(rho) if np.isfinite(rho) else None
    out["reward_std"] = float(r.std())
    out["samples"] = split.num_samples
    return out


# --------------------------------------------------------------------------------------------
# ARMs
# --------------------------------------------------------------------------------------------

def preference_pairs(split: Split, margin: float) -> list[tuple[int, int]]:
    """All (winner, loser) sample pairs within a prompt whose rewards differ by > margin."""
    pairs = []
    r = split.rewards.tolist()
    by_prompt: dict[int, list[int]] = {}
    for s, g in enumerate(split.group.tolist()):
        by_prompt.setdefault(g, []).append(s)
    for members in by_prompt.values():
        for a_i, a in enumerate(members):
            for b in members[a_i + 1:]:
                if abs(r[a] - r[b]) > margin:
                    pairs.append((a, b) if r[a] > r[b] else (b, a))
    return pairs


def _arm_rows(split: Split, samples: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """State rows predicting each response token of ``samples``, their targets, their owner."""
    rows, tgt, own = [], [], []
    tok_off = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), split.lengths - 1]), 0)
    for j, s in enumerate(samples):
        a, b = int(split.offsets[s]), int(split.offsets[s + 1]) - 1  # states s_0..s_{T-1}
        rows.append(torch.arange(a, b))
        tgt.append(split.tokens[int(tok_off[s]):int(tok_off[s + 1])])
        own.append(torch.full((b - a,), j, dtype=torch.long))
    return torch.cat(rows), torch.cat(tgt), torch.cat(own)


def arm_sequence_logprobs(head: ARMHead | LexicalARM | None, split: Split, samples: Sequence[int],
                          embed: Tensor) -> Tensor:
    """sum_t log pi_r(y_t | s_{t-1}) per sample (head None = the base model itself)."""
    rows, tgt, own = _arm_rows(split, samples)
    dev = embed.device
    h = split.hidden[rows].to(dev)
    with torch.no_grad():
        base_logits = h @ embed.T
    if head is None:
        lp = torch.log_softmax(base_logits, dim=-1)
    elif isinstance(head, LexicalARM):  # with its whole-word bias changes row by row
        return arm_sequence_logprobs_exact(head, split, samples, embed)
    else:
        lp = head.logprobs(split.adapter_input(head, rows).to(dev), base_logits, embed)
    picked = lp.gather(1, tgt.to(dev)[:, None])[:, 0]
    return torch.zeros(len(samples), device=dev).index_add(0, own.to(dev), picked)


def arm_sequence_logprobs_topk(head: ARMHead | LexicalARM | None, split: Split,
                               samples: Sequence[int], embed: Tensor) -> Tensor:
    """sum_t log pi_r(y_t | s_{t-1}) per sample, normalised over the base's top-TOPK tokens
    plus y_t instead of the whole vocabulary (head None = the base itself, exact: its
    normaliser comes from the recorded top-1 log-prob).

    For a base-placed ARM, s * l + E u(h) = (s h + u(h)) E^T, so the TOPK + 1 candidate logits
    are one small batched product; this is a sampled-softmax approximation that is exact when
    the candidates carry the ARM's mass (the top 64 hold almost all of the base's).
    """
    assert split.cand_ids is not None and split.cand_lp is not None
    rows, tgt, own = _arm_rows(split, samples)
    dev = embed.device
    tok_rows = _token_rows(split, samples)
    h = split.hidden[rows].to(dev).float()
    ids = split.cand_ids[tok_rows].to(dev).long()  # [N, K]
    y = tgt.to(dev)
    e_y = embed[y]  # [N, D]
    if head is None:  # log p(y) = l_y - lse, lse = l_top1 - lp_top1
        lse = (h * embed[ids[:, 0]]).sum(-1) - split.cand_lp[tok_rows, 0].to(dev).float()
        picked = (h * e_y).sum(-1) - lse
    elif isinstance(head, LexicalARM):
        # log pi_r(y) = log p(y) + b_y - log sum_a p(a) e^{b_a}: the top K from the recorded
        # log-probs, the tail at its base mass (bias ~ 0 there), y outside the top K apart
        top_lp = split.cand_lp[tok_rows].to(dev).float()
        if split.lex_y is None or split.lex_cand is None:
            raise ValueError("a lexical ARM needs Split.lex_y / lex_cand "
                             "(lexical_arm_features)")
        b_y = head.bias_of(split.lex_y[tok_rows].to(dev))
        b_c = head.bias_of(split.lex_cand[tok_rows].to(dev))
        lp_y = (h * e_y).sum(-1) - ((h * embed[ids[:, 0]]).sum(-1) - top_lp[:, 0])
        tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6))
        inside = (ids == y[:, None]).any(-1)
        rest = tail + torch.log1p(-torch.exp((lp_y - tail).clamp(max=-1e-6)))
        tail = torch.where(inside, tail, rest)
        ly = lp_y + b_y
        extra = torch.where(inside, torch.full_like(ly, float("-inf")), ly)
        lse = torch.logsumexp(torch.cat([top_lp + b_c, tail[:, None], extra[:, None]], 1), 1)
        picked = ly - lse
    else:
        # the base's own normaliser and tail mass outside the top K (exact, from the recorded
        # top-K log-probs); the tail enters the ARM's normaliser with its base mass (delta ~ 0
        # there), so only the prior scale s = 1 is consistent: train_arm freezes it
        top_lp = split.cand_lp[tok_rows].to(dev).float()
        lse_base = (h * embed[ids[:, 0]]).sum(-1) - top_lp[:, 0]
        tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6)) + lse_base
        g = head.base_scale * h + head.shift(split.adapter_input(head, rows).to(dev))  # [N, D]
        cand = torch.einsum("nd,nkd->nk", g, embed[ids])  # [N, K]
        inside = (ids == y[:, None]).any(-1)
        ly = (g * e_y).sum(-1)
        # a y outside the top K is part of the tail: take it out of the tail at its base logit
        # and put it back with the ARM's logit
        base_y = (h * e_y).sum(-1)
        rest = tail + torch.log1p(-torch.exp((base_y - tail).clamp(max=-1e-6)))
        tail = torch.where(inside, tail, rest)
        extra = torch.where(inside, torch.full_like(ly, float("-inf")), ly)
        lse = torch.logsumexp(torch.cat([cand, tail[:, None], extra[:, None]], 1), dim=1)
        picked = ly - lse
    return torch.zeros(len(samples), device=dev).index_add(0, own.to(dev), picked)


def _token_rows(split: Split, samples: Sequence[int]) -> Tensor:
    """Indices into the per-token arrays (tokens, cand_ids) of the given samples' tokens."""
    tok_off = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), split.lengths - 1]), 0)
    return torch.cat([torch.arange(int(tok_off[s]), int(tok_off[s + 1])) for s in samples])


def arm_sequence_logprobs_exact(head: ARMHead | LexicalARM, split: Split,
                                samples: Sequence[int], embed: Tensor) -> Tensor:
    """Like :func:`arm_sequence_logprobs` for a base-placed ARM, with one vocabulary matmul
    instead of two: log_softmax(s l + E u(h)) = log_softmax((s h + u(h)) E^T)."""
    rows, tgt, own = _arm_rows(split, samples)
    dev = embed.device
    h = split.hidden[rows].to(dev).float()
    if isinstance(head, LexicalARM):
        logits = h @ embed.float().T + head.bias(embed.shape[0])
        if head.lexicon is not None:  # whole-word features given each row's earlier tokens
            for i, before in token_windows(split.tokens[_token_rows(split, samples)].tolist(),
                                           (split.lengths[list(samples)] - 1).tolist()):
                d = head.context_delta(before, logits.shape[1])
                if d.any():
                    logits[i] += d.to(logits.device)
        lp = torch.log_softmax(logits, dim=-1)
    else:
        g = head.base_scale * h + head.shift(split.adapter_input(head, rows).to(dev))
        lp = torch.log_softmax(g @ embed.T, dim=-1)
    picked = lp.gather(1, tgt.to(dev)[:, None])[:, 0]
    return torch.zeros(len(samples), device=dev).index_add(0, own.to(dev), picked)


def _lexical_token_biases(head: LexicalARM, split: Split, rows: Tensor) -> Tensor:
    """[len(rows)] fp32 b(y_t) of the response tokens at ``rows`` (``_token_rows``), from
    ``split.lex_y`` (and, for a positional head, ``lex_end`` / ``lex_pos``)."""
    if split.lex_y is None:
        raise ValueError("a lexical ARM needs Split.lex_y (lexical_arm_features)")
    dev = head.table.device
    if not head.positions:
        return head.bias_of(split.lex_y[rows].to(dev))
    if split.lex_pos is None or split.lex_end is None:
        raise ValueError("a positional lexical ARM needs Split.lex_pos / lex_end "
                         "(lexical_arm_features with the head)")
    return head.bias_of(split.lex_y[rows].to(dev), split.lex_end[rows].to(dev),
                        split.lex_pos[rows].to(dev))


def lexical_token_rewards(head: LexicalARM, split: Split, samples: Sequence[int]) -> Tensor:
    """[len(samples)] fp32 the ``"token"`` reward of a ``LexicalARM``: sum_t b(y_t) per
    sample, from ``split.lex_y`` (each response token's feature given its earlier tokens,
    ``lexical_arm_features``); differentiable in the head's weights."""
    r = _lexical_token_biases(head, split, _token_rows(split, samples))
    _, _, own = _arm_rows(split, samples)
    return torch.zeros(len(samples), device=r.device).index_add(0, own.to(r.device), r)


def prefix_end_items(split: Split) -> dict[int, tuple[Tensor, Tensor]]:
    """Sample -> (cuts [n] long, rewards [n] fp32): the prefixes of its first ``cut`` tokens
    whose reward ``split.partial`` holds (``partial_rewards``: the reward source on the
    prefix's text, i.e. what the answer would score had it ended there)."""
    if split.partial is None:
        raise ValueError("end pairs need Split.partial (partial_rewards)")
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for s in range(split.num_samples):
        a, b = int(split.offsets[s]), int(split.offsets[s + 1])  # states s_0..s_T
        r = split.partial[a:b]
        cuts = torch.nonzero(~torch.isnan(r))[:, 0]
        cuts = cuts[(cuts > 0) & (cuts < b - a - 1)]  # a proper, non-empty prefix
        if len(cuts):
            out[s] = (cuts, r[cuts].float())
    return out


def lexical_end_rewards(head: LexicalARM, split: Split, samples: Sequence[int],
                        items: dict[int, tuple[Tensor, Tensor]]
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A positional ``LexicalARM``'s token reward of whole answers and of prefixes ended early.

    Returns ``(sums [len(samples)], ended [n], owner [n] long, reward [n])``: ``sums`` as
    :func:`lexical_token_rewards`; for each item ``(cut, reward)`` of ``items`` of the given
    samples, ``ended`` is the reward of the sample's first ``cut`` tokens followed by an
    end-of-text token (sum_{t<cut} b(y_t) + b(end at the prefix's position)), ``owner`` its
    sample's index in ``samples`` and ``reward`` the prefix's (standardised) reward.
    Differentiable in the head's weights."""
    if not head.positions:
        raise ValueError("answers ended early need a positional lexical ARM (an end flag)")
    dev = head.table.device
    rows = _token_rows(split, samples)
    r = _lexical_token_biases(head, split, rows)
    lens = (split.lengths[list(samples)] - 1).to(dev)
    starts = torch.cumsum(lens, 0) - lens
    c = torch.cat([r.new_zeros(1), torch.cumsum(r, 0)])
    sums = c[starts + lens] - c[starts]
    owner, cut, reward = [], [], []
    for i, s in enumerate(samples):
        if s in items:
            owner.append(torch.full((len(items[s][0]),), i, dtype=torch.long))
            cut.append(items[s][0])
            reward.append(items[s][1])
    if not owner:
        z = r.new_zeros(0)
        return sums, z, torch.zeros(0, dtype=torch.long, device=dev), z
    own = torch.cat(owner).to(dev)
    at = starts[own] + torch.cat(cut).to(dev)  # the token row the end token takes the place of
    end_id = int(torch.nonzero(head.end)[0, 0])
    feat = head.table[end_id].expand(len(at), -1)
    ended = c[at] - c[starts[own]] + head.bias_of(
        feat, torch.ones(len(at), device=dev), split.lex_pos.to(dev)[rows.to(dev)[at]])
    return sums, ended, own, torch.cat(reward).to(dev)


def end_pair_differences(sums: Tensor, ended: Tensor, own: Tensor, reward: Tensor,
                         rewards: Tensor, margin: float) -> Tensor:
    """[m] winner-minus-loser token rewards of the (answer, its prefix ended early) pairs whose
    rewards differ by > ``margin`` (``rewards``: the answers' [len(sums)])."""
    gap = reward - rewards[own]
    keep = gap.abs() > margin
    return (torch.sign(gap) * (ended - sums[own]))[keep]


@torch.no_grad()
def arm_metrics(head: ARMHead | LexicalARM, split: Split, pairs: list[tuple[int, int]],
                embed: Tensor, base_sums: Tensor | None = None, chunk: int = 32,
                approx: bool = False, margin: float = 0.0) -> dict[str, float | None]:
    """Pairwise accuracy of the ARM's reward sum log pi_r, of the base alone, and of the
    head's increment over the base (sum log pi_r - sum log pi_base). A ``LexicalARM``'s
    ``pairwise_accuracy`` is that of its reward (``reward_form``): the increment's, or the
    ``"token"`` reward's (then also given as ``token_pairwise_accuracy``).

    Exact (full-vocabulary normalisation) unless ``approx``, which normalises over the recorded
    top-TOPK candidates (cheap; used for the per-epoch validation line).

    A positional ARM on a split with ``partial`` rewards (``--end-pairs``) also gets
    ``end_pairwise_accuracy``: how often it orders an answer and its own prefix ended early
    (``lexical_end_rewards``) as their rewards do (differing by > ``margin``)."""
    n = split.num_samples
    topk = split.cand_ids is not None
    positional = isinstance(head, LexicalARM) and head.positions > 0
    if base_sums is None:
        base_fn = arm_sequence_logprobs_topk if topk else arm_sequence_logprobs
        base_sums = torch.cat([base_fn(None, split, range(i, min(i + chunk, n)), embed)
                               for i in range(0, n, chunk)]).cpu()
    if not pairs:
        return {"pairs": 0}
    w = torch.tensor([p[0] for p in pairs])
    ll = torch.tensor([p[1] for p in pairs])
    out: dict[str, float | None] = {
        "pairs": len(pairs),
        "base_pairwise_accuracy": float((base_sums[w] > base_sums[ll]).float().mean()),
    }
    if not positional:  # a positional ARM's reward is its token reward only (no increment)
        head_fn = arm_sequence_logprobs_topk if approx and topk else arm_sequence_logprobs_exact
        sums = torch.cat([head_fn(head, split, range(i, min(i + chunk, n)), embed)
                          for i in range(0, n, chunk)]).cpu()
        delta = float(((sums - base_sums)[w] > (sums - base_sums)[ll]).float().mean())
        out["pairwise_accuracy"] = delta if isinstance(head, LexicalARM) \
            else float((sums[w] > sums[ll]).float().mean())
        out["delta_pairwise_accuracy"] = delta
    if isinstance(head, LexicalARM) and head.reward_form == "token":
        if split.lex_y is None or (positional and split.lex_pos is None):
            # a split loaded outside train_arm (e.g. bench/head_ceiling)
            lexical_arm_features(split, head.table, head.lexicon, head)
        tok = torch.cat([lexical_token_rewards(head, split, range(i, min(i + chunk, n)))
                         for i in range(0, n, chunk)]).cpu()
        out["token_pairwise_accuracy"] = float((tok[w] > tok[ll]).float().mean())
        out["pairwise_accuracy"] = out["token_pairwise_accuracy"]
    if positional and split.partial is not None:  # answers against their prefixes, ended
        assert isinstance(head, LexicalARM)
        items = prefix_end_items(split)
        diffs = []
        for i in range(0, n, chunk):
            sums, ended, own, rew = lexical_end_rewards(head, split, range(i, min(i + chunk, n)),
                                                        items)
            diffs.append(end_pair_differences(sums, ended, own, rew,
                                              split.rewards[i:i + chunk].to(sums.device),
                                              margin).cpu())
        d = torch.cat(diffs)
        out["end_pair_count"] = len(d)
        out["end_pairwise_accuracy"] = float((d > 0).float().mean()) if len(d) else None
    return out


# --------------------------------------------------------------------------------------------
# training loops
# --------------------------------------------------------------------------------------------

def _ckpt_path(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir) / "checkpoints" / _slug(cfg.name or "head") / "last.pt"


_CKPT_UNSET: dict[str, Any] = {"arm_reward": None, "word_fit_alpha": None, "featurizer": None,
                               "positions": 0, "end_pairs": 0}


def _ckpt_settings(cfg: TrainConfig) -> dict[str, Any]:
    """Checkpoints resume only a run with the same settings (run dir, resume, progress, the
    command line and the epoch count, which a resumed run may raise, do not change the
    result of the epochs already done)."""
    d = asdict(cfg)
    for k in ("resume", "progress", "command", "run_dir", "out", "epochs"):
        d.pop(k)
    for k, unset in _CKPT_UNSET.items():  # added later: unset keeps older checkpoints' keys
        if d[k] == unset:
            d.pop(k)
    # filled for every head before 2026-12-01 (now null where they do not apply): the values
    # those runs recorded keep their checkpoints resumable
    for k, old in (("lam", 0.95), ("aux_every", 4), ("refresh_every", 0)):
        if d[k] is None:
            d[k] = old
    return d


def _ckpt_key(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(_ckpt_settings(cfg), sort_keys=True)
                          .encode()).hexdigest()[:16]


def _resumable_ckpt(cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint ``--resume`` continues (None: none, or no --resume); ValueError if it
    was written with other settings or is past ``--epochs``. ``run_training`` calls it before
    loading the model, so such a run fails in a second."""
    path = _ckpt_path(cfg)
    if not (cfg.resume and path.is_file()):
        return None
    ck = torch.load(path, weights_only=False)
    if ck["key"] != _ckpt_key(cfg):
        now, then = _ckpt_settings(cfg), ck.get("settings")  # recorded since 2026-12-01
        def val(d: dict[str, Any], k: str) -> Any:  # a key left out is at its unset value
            return d.get(k, _CKPT_UNSET.get(k))

        which = "" if then is None else " (" + ", ".join(
            f"--{k.replace('_', '-')} {val(then, k)!r} then, {val(now, k)!r} now"
            for k in sorted(set(now) | set(then)) if val(now, k) != val(then, k)) + ")"
        raise ValueError(f"{path} was written by a run with other settings{which}; drop "
                         "--resume or use another --run-dir")
    if int(ck["epoch"]) > int(cfg.epochs or 0):
        raise ValueError(f"--resume: {path} is at epoch {ck['epoch']}, past --epochs "
                         f"{cfg.epochs}; ask for at least {ck['epoch']} epochs or drop --resume")
    return ck


def _load_ckpt(cfg: TrainConfig, module: torch.nn.Module,
               opt: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    ck = _resumable_ckpt(cfg)
    if ck is None:
        return 0, []
    module.load_state_dict(ck["module"])
    opt.load_state_dict(ck["optim"])
    return int(ck["epoch"]), list(ck["history"])


def _save_ckpt(cfg: TrainConfig, module: torch.nn.Module, opt: torch.optim.Optimizer,
               epoch: int, history: list[dict[str, Any]]) -> None:
    path = _ckpt_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({"key": _ckpt_key(cfg), "settings": _ckpt_settings(cfg), "epoch": epoch,
                  "history": history,
                  "module": module.state_dict(), "optim": opt.state_dict()}, path)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_stable_int("order", seed, epoch))
    return g


def _renamed(metrics: dict[str, Any], **names: str) -> dict[str, Any]:
    """The entries ``names`` picks from ``metrics``, under their new names (new=old)."""
    return {new: metrics[old] for new, old in names.items()}


def _end_epoch(cfg: TrainConfig, head: torch.nn.Module, opt: torch.optim.Optimizer,
               bar: Any, history: list[dict[str, Any]], epoch: int, train_loss: float,
               val_metrics: Callable[[], dict[str, float | None]] | None,
               shown: tuple[str, str]) -> None:
    """Close an epoch of the value / Q-head loops: record the train loss and the held-out
    metrics (``val_metrics``, None without a validation split), show the loss and the metric
    ``shown = (label, key)`` on the progress bar, checkpoint."""
    head.eval()
    rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss}
    if val_metrics is not None:
        rec.update(val_metrics())
    history.append(rec)
    label, key = shown
    bar.set_postfix({"loss": f"{train_loss:.4f}",
                     label: "n/a" if rec.get(key) is None else f"{rec[key]:.3f}"}, refresh=False)
    _save_ckpt(cfg, head, opt, epoch + 1, history)


def train_value_head(cfg: TrainConfig, train: Split,
                     val: Split | None = None) -> tuple[ValueHead, list[dict[str, Any]]]:
    """Fit a ValueHead on the cached states with the configured target (see module doc)."""
    dev = torch.device(cfg.device)
    torch.manual_seed(_stable_int("init", cfg.seed))
    x = train.hidden.to(dev)
    head = ValueHead(x.shape[1] // 2 if cfg.pool == "mean" else x.shape[1], cfg.hidden,
                     cfg.pool).to(dev)
    head.mu.copy_(x.mean(0))
    head.sigma.copy_(x.std(0).clamp_min(1e-4))
    # auxiliary target: the reward of the partial text, read from the head's hidden layer by a
    # second output that is trained alongside and dropped (it shapes the features only)
    part = train.partial.to(dev) if cfg.aux_partial and train.partial is not None else None
    aux = torch.nn.Linear(cfg.hidden, 1).to(dev) if part is not None else None
    params = [*head.parameters(), *(aux.parameters() if aux is not None else ())]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history = _load_ckpt(cfg, head, opt)
    assert cfg.epochs is not None and cfg.batch_size is not None
    bar = progress_bar(range(start, cfg.epochs), desc=f"train {cfg.name} ({cfg.method})",
                       unit="epoch", disable=not cfg.progress, initial=start, total=cfg.epochs)
    step = start * math.ceil(len(x) / cfg.batch_size)  # keeps the refresh schedule on resume
    for epoch in bar:
        head.train()
        perm = torch.randperm(len(x), generator=_epoch_generator(cfg.seed, epoch)).to(dev)
        targets = value_targets(cfg.method, _predict(head, x).cpu(), train, cfg.lam).to(dev)
        total, count = 0.0, 0
        for b in range(0, len(perm), cfg.batch_size):
            if cfg.refresh_every and step and step % cfg.refresh_every == 0 \
                    and cfg.method != "fudge":
                targets = value_targets(cfg.method, _predict(head, x).cpu(), train,
                                        cfg.lam).to(dev)
            idx = perm[b:b + cfg.batch_size]
            loss = F.mse_loss(head(x[idx]), targets[idx])
            if aux is not None and part is not None:
                tgt = part[idx]
                has = ~torch.isnan(tgt)
                if bool(has.any()):
                    feat = torch.tanh(head.fc1((x[idx][has] - head.mu) / head.sigma))
                    loss = loss + cfg.aux_partial * F.mse_loss(aux(feat).squeeze(-1), tgt[has])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total += loss.item() * len(idx)
            count += len(idx)
        _end_epoch(cfg, head, opt, bar, history, epoch, total / max(count, 1),
                   None if val is None else lambda: _renamed(
                       value_metrics(head, val), val_mse="mse", val_spearman_50="spearman_50"),
                   ("rho50", "val_spearman_50"))
    bar.close()
    head.eval()
    return head, history


# --------------------------------------------------------------------------------------------
# Q-heads (values of every next token from one state)
# --------------------------------------------------------------------------------------------

def _transition_index(split: Split) -> tuple[Tensor, Tensor]:
    """Rows of s_t (t < T) and the matching index into the flat response ``tokens``."""
    sample, step, last = _position_index(split)
    rows = torch.nonzero(~last).squeeze(1)
    tok = split.offsets[:-1][sample[rows]] - sample[rows] + step[rows]
    return rows, tok


@torch.no_grad()
def q_targets(value: torch.nn.Module, split: Split) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(state rows, token ids, target advantages V(s_{t+1}) - V(s_t), index of each
    transition's recorded top-64 candidates) along the samples."""
    v = _predict(value, split.hidden)
    rows, tok = _transition_index(split)
    return rows, split.tokens[tok], v[rows + 1] - v[rows], tok


def q_advantage(head: QHead, h: Tensor, ids: Tensor, embed: Tensor,
                cand_ids: Tensor | None = None, cand_lp: Tensor | None = None) -> Tensor:
    """[N] Q(s, a) - E_{a' ~ pi_base} Q(s, a') for N (state, token) pairs.

    Centring under the base policy (over the state's recorded top-64 tokens) removes whatever
    depends on the state alone, so the head must explain the target V([s, a]) - V(s) (zero mean
    under pi_base, since V(s) ~ E_a V([s, a])) by how tokens differ, which is all VAS / CD use.
    Without recorded candidates the raw Q(s, a) is returned.
    """
    q = head.query(h)  # [N, D]
    out = (embed[ids].float() * q).sum(-1)
    if cand_ids is None or cand_lp is None:
        return out
    p = torch.softmax(cand_lp.float(), -1)  # [N, 64]
    qc = (embed[cand_ids].float() @ q[:, :, None]).squeeze(-1)  # [N, 64]
    return out - (p * qc).sum(-1)


@torch.no_grad()
def _q_predict(head: QHead, split: Split, rows: Tensor, ids: Tensor, tok: Tensor,
               embed: Tensor, chunk: int = 4096) -> Tensor:
    """``q_advantage`` of the transitions (state rows, token ids, candidate index ``tok``, as
    ``q_targets`` returns them), in chunks."""
    cid, clp = split.cand_ids, split.cand_lp
    return torch.cat([q_advantage(head, split.hidden[rows[i:i + chunk]], ids[i:i + chunk], embed,
                                  None if cid is None else cid[tok[i:i + chunk]],
                                  None if clp is None else clp[tok[i:i + chunk]])
                      for i in range(0, len(rows), chunk)])


@torch.no_grad()
def q_metrics(head: QHead, value: torch.nn.Module, split: Split, embed: Tensor,
              min_gap: float = 0.05) -> dict[str, float]:
    """How well the Q-head ranks next tokens against the value head's V([s, a]).

    ``spearman``: rho between predicted and target advantages over every sampled transition.
    ``first_token_pairwise_accuracy``: at the prompt's last state s_0, shared by the K samples
    of a prompt, the pairs of different first tokens whose V(s_1) differ by more than
    ``min_gap`` stds, ordered as the value head orders them (what VAS / CD need: a ranking of
    candidates at one state).
    """
    from scipy.stats import spearmanr

    rows, ids, target, tok = q_targets(value, split)
    pred = _q_predict(head, split, rows, ids, tok, embed)
    rho = spearmanr(pred.numpy(), target.numpy()).statistic
    first = split.offsets[:-1]
    has_tok = split.lengths > 1
    v1 = _predict(value, split.hidden[first + 1])
    first_tok = split.tokens[(first - torch.arange(len(first))).clamp_max(len(split.tokens) - 1)]
    q0 = head(split.hidden[first], embed[first_tok][:, None])[:, 0]
    right = total = 0
    for g in split.group.unique().tolist():
        members = [i for i in torch.nonzero(split.group == g).squeeze(1).tolist() if has_tok[i]]
        for a_i, a in enumerate(members):
            for b in members[a_i + 1:]:
                if first_tok[a] == first_tok[b] or abs(float(v1[a] - v1[b])) <= min_gap:
                    continue
                total += 1
                right += int((float(q0[a] - q0[b]) > 0) == (float(v1[a] - v1[b]) > 0))
    return {"spearman": float(rho) if np.isfinite(rho) else 0.0,
            "first_token_pairwise_accuracy": right / total if total else float("nan"),
            "first_token_pairs": total, "transitions": len(rows)}


@torch.no_grad()
def q_calibration(head: QHead, value: torch.nn.Module, split: Split, embed: Tensor,
                  rows_max: int = 65536) -> float:
    """std(target) / std(prediction) of the policy-centred advantages on (a deterministic
    subsample of) ``split``'s transitions: the factor that undoes the regression's shrinkage."""
    rows, ids, target, tok = q_targets(value, split)
    step = max(1, len(rows) // rows_max)
    rows, ids, target, tok = rows[::step], ids[::step], target[::step], tok[::step]
    pred = _q_predict(head, split, rows, ids, tok, embed)
    return float(target.std() / pred.std().clamp_min(1e-6))


def train_q_head(cfg: TrainConfig, train: Split, value: torch.nn.Module, embed: Tensor,
                 val: Split | None = None) -> tuple[QHead, list[dict[str, Any]]]:
    """Fit a QHead: E[a_t] . q(h_t), centred under the base policy (``q_advantage``),
    regresses V(s_{t+1}) - V(s_t) of ``value`` (a trained ValueHead in reward stds) on every
    transition of the base's own samples."""
    dev = torch.device(cfg.device)
    torch.manual_seed(_stable_int("init", cfg.seed))
    pool = getattr(value, "pool", "none")
    head = QHead(embed.shape[1], cfg.rank, pool).to(dev)
    head.mu.copy_(train.hidden.mean(0))
    head.sigma.copy_(train.hidden.std(0).clamp_min(1e-4))
    rows, ids, target, tok = q_targets(value, train)
    x, e, target = train.hidden[rows].to(dev), embed.float().to(dev), target.to(dev)
    ids = ids.to(dev)
    cid = train.cand_ids[tok].to(dev) if train.cand_ids is not None else None
    clp = train.cand_lp[tok].to(dev) if train.cand_lp is not None else None
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history = _load_ckpt(cfg, head, opt)
    assert cfg.epochs is not None and cfg.batch_size is not None
    bar = progress_bar(range(start, cfg.epochs), desc=f"train {cfg.name} (distill V)", unit="epoch",
                       disable=not cfg.progress, initial=start, total=cfg.epochs)
    for epoch in bar:
        head.train()
        perm = torch.randperm(len(x), generator=_epoch_generator(cfg.seed, epoch)).to(dev)
        total, count = 0.0, 0
        for b in range(0, len(perm), cfg.batch_size):
            idx = perm[b:b + cfg.batch_size]
            pred = q_advantage(head, x[idx], ids[idx], e, None if cid is None else cid[idx],
                               None if clp is None else clp[idx])
            loss = F.mse_loss(pred, target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        _end_epoch(cfg, head, opt, bar, history, epoch, total / max(count, 1),
                   None if val is None else lambda: _renamed(
                       q_metrics(head, value, val, embed), val_spearman="spearman",
                       val_first_token_accuracy="first_token_pairwise_accuracy"),
                   ("rho", "val_spearman"))
    bar.close()
    head.eval()
    return head, history


def _pair_batches(pairs: list[tuple[int, int]], group: Tensor, batch_pairs: int,
                  gen: torch.Generator) -> list[list[tuple[int, int]]]:
    """Shuffled batches of whole prompts holding about ``batch_pairs`` pairs each.

    Keeping a prompt's pairs together means each response's log-probability sum is computed
    once per batch even when it appears in several pairs (up to K-1).
    """
    by_prompt: dict[int, list[tuple[int, int]]] = {}
    for p in pairs:
        by_prompt.setdefault(int(group[p[0]]), []).append(p)
    keys = sorted(by_prompt)
    order = torch.randperm(len(keys), generator=gen).tolist()
    batches, cur = [], []
    for i in order:
        cur += by_prompt[keys[i]]
        if len(cur) >= batch_pairs:
            batches.append(cur)
            cur = []
    if cur:
        batches.append(cur)
    return batches


def lexical_arch(featurizer: str, table: Tensor, lexicon: Lexicon | None,
                 fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's ``arch.lexical`` of a lexical head (``fit``: a fitted featurizer's
    ``fit_word_scores`` info)."""
    out: dict[str, Any] = {"featurizer": featurizer, "vocab": int(table.shape[0]),
                           "features": int(table.shape[1])}
    if lexicon is not None:
        out["lexicon_words"] = len(lexicon.words)
    if fit is not None:
        out["word_fit"] = fit
    return out


def response_texts(tokenizer: Any, split: Split) -> list[str]:
    """[num_samples] the decoded response of every sample of ``split``, in sample order: its
    T_s = ``lengths - 1`` tokens with special tokens (the EOS) skipped. Decoding the tokens
    can differ from the streamed response text in rare byte-level cases."""
    lengths = (split.lengths - 1).tolist()
    ends = np.cumsum([0, *lengths])
    return [tokenizer.decode(split.tokens[a:b].tolist(), skip_special_tokens=True)
            for a, b in zip(ends[:-1], ends[1:])]


def lexical_positions(head: LexicalARM, tokens: Tensor, lengths: Sequence[int]) -> Tensor:
    """[sum T_s] long: the position bucket (``LexicalARM.position_of``) before every token of
    samples laid back to back (sample s has ``lengths[s]`` tokens): the floored sum of the
    table's first feature over the sample's earlier tokens, clipped to 0..P-1."""
    f = head.counted(tokens).cpu()
    c = torch.cumsum(f, 0) - f  # exclusive running sum over everything before the token
    starts = torch.cumsum(torch.tensor([0, *lengths[:-1]], dtype=torch.long), 0)
    own = torch.repeat_interleave(torch.arange(len(lengths)),
                                  torch.tensor(list(lengths), dtype=torch.long))
    padded = torch.cat([c, c.new_zeros(1)])  # a sample with no tokens may start at the end
    before = padded[starts][own] if len(lengths) else c
    return head.bucket(c - before)


def lexical_arm_features(split: Split, table: Tensor, lexicon: Lexicon | None,
                         head: LexicalARM | None = None) -> None:
    """Fill ``split.lex_y`` / ``lex_cand``: the feature of every response token and of every
    recorded top-K candidate at its state, with the lexicon's whole-word features given the
    sample's earlier tokens (``lexical.apply_lexicon`` / ``Lexicon.deltas``). For a
    positional ``head``, also ``lex_pos`` / ``lex_end`` (each token's position bucket and
    end-of-text flag)."""
    lengths = (split.lengths - 1).tolist()
    split.lex_y = contextual_rows(table, split.tokens, lengths, lexicon)
    if head is not None and head.positions:
        split.lex_pos = lexical_positions(head, split.tokens, lengths)
        split.lex_end = head.end.cpu()[split.tokens.long().clamp_max(table.shape[0] - 1)]
    if split.cand_ids is None:
        return
    ids = split.cand_ids.long()
    cand = table[ids.clamp_max(table.shape[0] - 1)] * (ids < table.shape[0])[..., None]
    if lexicon is not None:
        for j, before in token_windows(split.tokens.tolist(), lengths):
            d = lexicon.deltas(before, table[:, 0], ids[j])
            if d is not None:
                cand[j, :, 0] += d
    split.lex_cand = cand


def train_arm(cfg: TrainConfig, train: Split, embed: Tensor, val: Split | None = None,
              margin: float = 0.0, lex_table: Tensor | None = None,
              lexicon: Lexicon | None = None, end_ids: Sequence[int] = (),
              ) -> tuple[ARMHead | LexicalARM, list[dict[str, Any]]]:
    """Fit an ARMHead (or, given the featurizer's ``lex_table`` [V, F], a ``LexicalARM``) with
    GenARM's pairwise loss on reward-ranked base samples.

    An ``ARMHead``'s reward is r(y) = sum_t log pi_r(y_t); its learned prior scale can discount
    the base's likelihood. A ``LexicalARM`` has no such scale (it must keep the base's
    temperature), so its reward reads its bias (``cfg.arm_reward``, ``LexicalARM``): the
    increment over the base, r(y) = sum_t log pi_r(y_t) - log p_base(y_t) (the DPO-style
    implicit reward against the reference: two answers' likelihoods under the base, which have
    nothing to do with the reward, then cancel), or the per-token reward sum_t b(y_t).
    ``end_ids``: the base's end-of-text token ids (a positional ARM's ``end`` flags)."""
    dev = torch.device(cfg.device)
    torch.manual_seed(_stable_int("init", cfg.seed))
    head: ARMHead | LexicalARM
    if lex_table is not None:
        head = LexicalARM(*lex_table.shape, cfg.hidden, cfg.arm_reward or "token",
                          cfg.positions, cfg.max_new_tokens)
        head.table.copy_(lex_table)
        if cfg.positions:
            head.end[[i for i in end_ids if i < lex_table.shape[0]]] = 1.0
        head.lexicon = lexicon
        head = head.to(dev)
        for sp in (train, val):
            if sp is not None:
                lexical_arm_features(sp, lex_table, lexicon, head)
    else:
        head = ARMHead(train.hidden.shape[1], cfg.rank, cfg.pool).to(dev)
        if train.cand_ids is not None:  # top-K training normalises the tail at the base's scale
            head.base_scale.requires_grad_(False)
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    start, history = _load_ckpt(cfg, head, opt)
    pairs = preference_pairs(train, margin)
    if not pairs:
        raise ValueError("no preference pairs: every prompt's samples tie on the reward "
                         "(lower --margin or raise --samples)")
    val_pairs = preference_pairs(val, margin) if val is not None else []
    val_base = None
    # the recorded top-TOPK candidates make each step a few small products instead of two
    # [tokens, vocabulary] matmuls (see arm_sequence_logprobs_topk)
    seq_logprobs = arm_sequence_logprobs_topk if train.cand_ids is not None \
        else arm_sequence_logprobs
    assert cfg.epochs is not None and cfg.batch_size is not None
    base_sums = None
    token_form = isinstance(head, LexicalARM) and head.reward_form == "token"
    end_items = prefix_end_items(train) if cfg.end_pairs else None
    if end_items is not None and not end_items:
        raise ValueError(f"--end-pairs {cfg.end_pairs}: no training answer is longer than "
                         f"{cfg.end_pairs} tokens, so there is no prefix to pair; lower it")
    if isinstance(head, LexicalARM) and not token_form:  # the increment over the base
        with torch.no_grad():
            base_sums = torch.cat([seq_logprobs(None, train, range(i, min(
                i + 256, train.num_samples)), embed) for i in range(0, train.num_samples, 256)])
    for epoch in range(start, cfg.epochs):
        head.train()
        batches = _pair_batches(pairs, train.group, cfg.batch_size,
                                _epoch_generator(cfg.seed, epoch))
        total, count = 0.0, 0
        bar = progress_bar(batches, desc=f"train {cfg.name} epoch {epoch + 1}/{cfg.epochs}",
                           unit="batch", disable=not cfg.progress)
        for batch in bar:
            samples = sorted({s for p in batch for s in p})
            pos = {s: i for i, s in enumerate(samples)}
            extra = None
            if end_items is not None:  # and each answer against its prefixes, ended early
                assert isinstance(head, LexicalARM)
                sums, ended, own, rew = lexical_end_rewards(head, train, samples, end_items)
                extra = end_pair_differences(sums, ended, own, rew, train.rewards[
                    torch.tensor(samples)].to(dev), margin)
            elif token_form:
                assert isinstance(head, LexicalARM)
                sums = lexical_token_rewards(head, train, samples)
            else:
                sums = seq_logprobs(head, train, samples, embed)
            if base_sums is not None:
                sums = sums - base_sums[torch.tensor(samples, device=dev)]
            w = torch.tensor([pos[p[0]] for p in batch], device=dev)
            ll = torch.tensor([pos[p[1]] for p in batch], device=dev)
            diff = sums[w] - sums[ll] if extra is None else torch.cat([sums[w] - sums[ll], extra])
            loss = -F.logsigmoid(cfg.beta_r * diff).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
            count += len(batch)
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        bar.close()
        head.eval()
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(count, 1)}
        if val is not None and val_pairs:
            base_fn = arm_sequence_logprobs_topk if val.cand_ids is not None \
                else arm_sequence_logprobs
            if val_base is None:
                val_base = torch.cat([
                    base_fn(None, val, range(i, min(i + 32, val.num_samples)), embed)
                    for i in range(0, val.num_samples, 32)]).cpu()
            m = arm_metrics(head, val, val_pairs, embed, val_base, approx=True, margin=margin)
            rec["val_pairwise_accuracy"] = m["pairwise_accuracy"]
            if "end_pairwise_accuracy" in m:
                rec["val_end_pairwise_accuracy"] = m["end_pairwise_accuracy"]
        history.append(rec)
        print(f"[{cfg.name}] epoch {epoch + 1}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float)), file=sys.stderr)
        _save_ckpt(cfg, head, opt, epoch + 1, history)
    head.eval()
    return head, history


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def _reward_range(weights: dict[str, float], base: BaseModel) -> list[float]:
    from .rewards import default_rewards

    sources = default_rewards(base.model_dir)
    lo = hi = 0.0
    for name, w in weights.items():
        a, b = sources[name].info.range
        lo += min(w * a, w * b)
        hi += max(w * a, w * b)
    return [lo, hi]


def _value_head_for(cfg: TrainConfig, fingerprint: str | None, dim: int | None) -> Head:
    """The value head a Q-head distils: ``cfg.value_head``, else ``<reward>_value`` beside
    ``cfg.out`` (what ``train all`` has just written), else the shipped one."""
    from .heads import default_heads_dir, load_head

    name = f"{cfg.reward}_value"
    for folder in ([Path(cfg.value_head)] if cfg.value_head else
                   [Path(cfg.out).parent / name, default_heads_dir() / name]):
        if (folder / "manifest.json").is_file():
            head = load_head(folder, fingerprint, dim)
            if head.kind != "value":
                raise ValueError(f"--value-head {folder} is a {head.kind} head, not a value head")
            if head.manifest.get("reward") != cfg.reward:
                raise ValueError(f"--value-head {folder} approximates "
                                 f"{head.manifest.get('reward')!r}, not --reward {cfg.reward!r}")
            return head
    raise ValueError(f"no value head to distil for {cfg.reward!r}: train {name} first or pass "
                     "--value-head DIR")


def run_training(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> Head:
    """Sample (cached), featurise (cached), train, evaluate and save one head to ``cfg.out``."""
    log = log or (lambda s: print(s, file=sys.stderr))
    cfg = cfg.resolved()
    weights = parse_reward_spec(cfg.reward)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    pool = cfg.pool
    if cfg.kind == "q":  # fail before an hour of sampling, not after
        varch = _value_head_for(cfg, None, None).manifest["arch"]
        if "lexical" in varch:
            raise ValueError("--value-head is a lexical value head: it needs no Q-head (VAS / "
                             "CD read its exact value of every candidate from the token ids)")
        pool = varch.get("pool", "none")
    _resumable_ckpt(cfg)  # a checkpoint --resume cannot continue fails before the model loads
    base = BaseModel(cfg.model, cfg.device, cfg.slots, cfg.threads)
    try:
        base.check_backbone_layers(cfg.backbone_layers)
        train = load_split(base, cfg, "train", cfg.prompts, weights)
        val = load_split(base, cfg, "validation", cfg.val_prompts, weights) \
            if cfg.val_prompts != 0 else None
        embed = base.embed if cfg.kind in ("arm", "q") else None
        fingerprint = tokenizer_fingerprint(base.tokenizer)
        lex_table, lexicon, lex_fit = None, None, None
        if cfg.lexical:
            from .lexical import FITTED_FEATURIZERS, fitted_table, lexical_table, lexicon_for

            lex_name = cfg.lexical_featurizer()
            if lex_name in FITTED_FEATURIZERS:  # word scores fitted to the train answers
                lex_table, lexicon, lex_fit = fitted_table(
                    lex_name, base.tokenizer, response_texts(base.tokenizer, train),
                    train.rewards.tolist(), train.group.tolist(), cfg.word_fit_alpha)
                log(f"[{cfg.name}] {lex_name}: " + json.dumps(lex_fit))
            else:
                lex_table = lexical_table(lex_name, base.tokenizer)
                lexicon = lexicon_for(lex_name, base.tokenizer)
        rrange = _reward_range(weights, base)
        # a positional lexical ARM's end-of-text flags (the engine starts only for those)
        eos_ids = sorted(base.engine.eos_ids) if cfg.positions else []
    finally:
        base.close()
    dim = int(train.hidden.shape[1])  # the base's hidden size
    if lex_table is not None and cfg.kind == "value":  # per-token features, not the states
        from .lexical import lexical_features

        for sp in (train, val):
            if sp is not None:
                sp.hidden = lexical_features(lex_table, sp.tokens, sp.offsets, lexicon)
    if pool == "mean":  # the head reads [h_t, mean(h_0..h_t)]
        for sp in (train, val):
            if sp is None:
                continue
            if cfg.kind == "arm":  # base logits still come from the states themselves
                sp.pooled = mean_pool_features(sp.hidden, sp.offsets)
            else:
                sp.hidden = mean_pool_features(sp.hidden, sp.offsets)
    r_mean, r_std = float(train.rewards.mean()), float(train.rewards.std())
    log(f"[{cfg.name}] {train.num_samples} train samples ({len(train.hidden)} states), "
        f"{val.num_samples if val else 0} validation samples; reward mean "
        f"{r_mean:.3f} std {r_std:.3f}")
    if not r_std > 0:
        raise ValueError(f"reward {cfg.reward!r} is constant over the samples; nothing to learn")
    # every target, metric and preference margin below is in reward standard deviations
    train.rewards = (train.rewards - r_mean) / r_std
    for sp in (train, val):
        if sp is not None and sp.partial is not None:
            sp.partial = (sp.partial - r_mean) / r_std
    if val is not None:
        val.rewards = (val.rewards - r_mean) / r_std
    data_info = {"train_samples": train.num_samples, "train_states": len(train.hidden),
                 "val_samples": val.num_samples if val else 0,
                 "train_reward_mean": r_mean, "train_reward_std": r_std,
                 "sample_cache": str(train.folder)}
    metrics: dict[str, Any]
    if cfg.kind == "q":
        assert embed is not None
        vhead = _value_head_for(cfg, fingerprint, dim)
        data_info["value_head"] = str(vhead.path)
        data_info["value_head_sha256"] = vhead.weights_sha256
        data_info["pool"] = pool  # the value head's, which the Q-head reads too
        module, history = train_q_head(cfg, train, vhead.module, embed, val)
        module.scale.fill_(q_calibration(module, vhead.module, train, embed))
        data_info["calibration_scale"] = float(module.scale)
        module.r_mean.fill_(r_mean)
        module.r_std.fill_(r_std)
        metrics = q_metrics(module, vhead.module, val, embed) if val else {}
        arch = {"dim": dim, "rank": cfg.rank, "pool": pool}
        desc = (f"Q-head: advantage Q(prefix, a) - V(prefix) of every next token for "
                f"{cfg.reward}, in reward standard deviations, distilled from "
                f"{vhead.name}; for VAS / controlled decoding without a tree forward")
        wrange = [-20.0, 20.0]
    elif cfg.kind == "value":
        module, history = train_value_head(cfg, train, val)
        module.r_mean.fill_(r_mean)
        module.r_std.fill_(r_std)
        metrics = value_metrics(module, val) if val else {}
        arch = {"dim": dim, "hidden": cfg.hidden, "pool": cfg.pool}
        if lex_table is not None:
            from .lexical import LexicalValueHead

            lex = LexicalValueHead(*lex_table.shape, cfg.hidden)
            lex.load_state_dict({**module.cpu().state_dict(), "table": lex_table})
            lex.lexicon = lexicon
            module = lex
            arch["lexical"] = lexical_arch(lex_name, lex_table, lexicon, lex_fit)
        if cfg.backbone_layers:
            arch["layers"] = cfg.backbone_layers
        desc = (f"value head V(prefix) ~ expected {cfg.reward} of a base continuation, in "
                f"reward standard deviations ({cfg.method}); for VAS / controlled decoding")
        if lex_table is not None:
            desc = (f"lexical value head V(prefix) ~ expected {cfg.reward}, from per-token "
                    f"{lex_name} features of the answer so far (no model states), in reward "
                    f"standard deviations ({cfg.method}); VAS / CD value every candidate "
                    "without a forward")
        wrange = [-20.0, 20.0]
    else:
        assert embed is not None
        margin = cfg.margin  # rewards are standardised: margin in reward stds
        module, history = train_arm(cfg, train, embed, val, margin, lex_table, lexicon,
                                    eos_ids)
        metrics = arm_metrics(module, val, preference_pairs(val, margin), embed,
                              margin=margin) if val else {}
        metrics["margin"] = margin
        data_info["train_pairs"] = len(preference_pairs(train, margin))
        arch = {"dim": dim, "rank": cfg.rank, "pool": cfg.pool}
        if cfg.backbone_layers:  # its "base logits" are then the backbone's early-exit logits
            arch["layers"] = cfg.backbone_layers
        desc = (f"autoregressive reward model (GenARM) for {cfg.reward}: low-rank logit "
                "adapter on the base's hidden state")
        if lex_table is not None:
            arch = {"hidden": cfg.hidden, "reward_form": cfg.arm_reward or "token",
                    "lexical": lexical_arch(lex_name, lex_table, lexicon, lex_fit)}
            desc = (f"lexical ARM (GenARM) for {cfg.reward}: a per-token logit bias on the "
                    f"base, learned from each token's {lex_name} feature (no model states)")
            if cfg.positions:  # past the samples' length the ARM adds no bias (horizon)
                arch["positions"] = cfg.positions
                arch["horizon"] = cfg.max_new_tokens
                desc += (f", its end-of-text flag and the answer's position (the {lex_name} "
                         f"sum so far, {cfg.positions} buckets)")
        # GenARM refuses negative weights (decoders/genarm.py); a per-token-reward lexical ARM's
        # bias spans about +-20 logits, so its useful alphas are ten times smaller (README)
        wrange = [0.0, 0.5] if lex_table is not None and (cfg.arm_reward or "token") == "token" \
            else [0.0, 5.0]
        if cfg.positions:  # measured on concise_lex_arm: alpha 0.5 cut answers to 1-2 words
            wrange = [0.0, 0.3]
    training = {**asdict(cfg), **data_info, "history": history,
                "seconds": round(time.perf_counter() - t0, 1)}
    manifest = {"description": desc, "reward": cfg.reward, "reward_weights": weights,
                "range": [(rrange[0] - r_mean) / r_std, (rrange[1] - r_mean) / r_std]
                if cfg.kind != "arm" else [-1e9, 0.0],
                "reward_stats": {"mean": r_mean, "std": r_std, "reward_range": rrange},
                "tokenizer": fingerprint, "arch": arch,
                "placement": "tokens" if "lexical" in arch
                else "backbone" if arch.get("layers") else "base",
                "weight_range": wrange, "training": training, "metrics": metrics}
    if not math.isfinite(history[-1]["train_loss"] if history else 0.0):
        raise ValueError(f"training diverged (non-finite loss at epoch {len(history)}); "
                         f"nothing saved to {cfg.out}: lower --lr")
    module = module.cpu()
    head = Head(cfg.name or Path(cfg.out).name, cfg.kind, module, manifest)
    save_head(Path(cfg.out), head)
    log(f"[{cfg.name}] saved {cfg.out}: " + json.dumps(
        {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return head


# --------------------------------------------------------------------------------------------
# the shipped heads
# --------------------------------------------------------------------------------------------

# One sample cache (suite, prompts, K, tokens, temperature, seed) serves every shipped head; the
# settings per head are the ones that gave the best validation metrics (see README, Training).
SHIPPED_DATA: dict[str, Any] = {"suite": "all", "prompts": 1024, "val_prompts": 80,
                                "samples": 8, "max_new_tokens": 48, "seed": 0}
SHIPPED_HEADS: dict[str, dict[str, Any]] = {
    "sentiment_value": {"kind": "value", "reward": "sentiment", "method": "td-lambda",
                        "hidden": 64, "weight_decay": 0.01, "pool": "mean"},
    "non_toxic_value": {"kind": "value", "reward": "non_toxic", "method": "td-lambda",
                        "hidden": 64, "weight_decay": 0.01},
    "concise_value": {"kind": "value", "reward": "concise", "method": "td-lambda",
                      "hidden": 64, "weight_decay": 0.01, "pool": "mean"},
    "concise_lex": {"kind": "value", "reward": "concise", "method": "td-lambda",
                    "hidden": 64, "weight_decay": 0.01, "lexical": True},
    "non_toxic_lex": {"kind": "value", "reward": "non_toxic", "method": "td-lambda",
                      "hidden": 64, "weight_decay": 0.01, "lexical": True},
    "sentiment_lex": {"kind": "value", "reward": "sentiment", "method": "td-lambda",
                      "hidden": 64, "weight_decay": 0.01, "lexical": True},
    "sentiment_lex_margin": {"kind": "value", "reward": "sentiment", "method": "td-lambda",
                             "hidden": 64, "weight_decay": 0.01, "lexical": True,
                             "featurizer": "minilm_sentiment"},
    "sentiment_q": {"kind": "q", "reward": "sentiment", "rank": 64, "epochs": 4,
                    "batch_size": 1024, "lr": 1e-3},
    "non_toxic_q": {"kind": "q", "reward": "non_toxic", "rank": 64, "epochs": 4,
                    "batch_size": 1024, "lr": 1e-3},
    "concise_q": {"kind": "q", "reward": "concise", "rank": 64, "epochs": 4,
                  "batch_size": 1024, "lr": 1e-3},
    "sentiment_arm": {"kind": "arm", "reward": "sentiment", "epochs": 3, "lr": 1e-3},
    "non_toxic_arm": {"kind": "arm", "reward": "non_toxic", "epochs": 3, "lr": 1e-3},
    "concise_arm": {"kind": "arm", "reward": "concise", "epochs": 3, "lr": 1e-3},
    "sentiment_lex_arm": {"kind": "arm", "reward": "sentiment", "lexical": True, "hidden": 16,
                          "arm_reward": "token", "epochs": 3, "lr": 1e-2},
    "non_toxic_lex_arm": {"kind": "arm", "reward": "non_toxic", "lexical": True, "hidden": 16,
                          "arm_reward": "token", "epochs": 3, "lr": 1e-2},
    "concise_lex_arm": {"kind": "arm", "reward": "concise", "lexical": True, "hidden": 16,
                        "arm_reward": "token", "positions": 40, "end_pairs": 4, "epochs": 3,
                        "lr": 1e-2},
}


def shipped_configs(out_dir: str | Path, **overrides: Any) -> list[TrainConfig]:
    """TrainConfigs that rebuild every shipped head into ``out_dir/<name>``; ``overrides``
    (e.g. run_dir, threads, prompts) apply to all of them."""
    cfgs = []
    for name, spec in SHIPPED_HEADS.items():
        kw = {**SHIPPED_DATA, **spec, **{k: v for k, v in overrides.items() if v is not None}}
        cfgs.append(TrainConfig(out=str(Path(out_dir) / name), name=name, **kw))
    return cfgs


def sample_only(cfg: TrainConfig) -> None:
    """Fill the sample cache (validation, then train) without training anything."""
    cfg = cfg.resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = BaseModel(cfg.model, cfg.device, cfg.slots, cfg.threads)
    try:
        for split, n in (("validation", cfg.val_prompts), ("train", cfg.prompts)):
            if n == 0:
                continue
            prompts = select_prompts(split, cfg.suite, n)
            sample_responses(base, cfg, prompts, cache_dir(cfg, split))
    finally:
        base.close()


def train_all(out_dir: str | Path, only: Sequence[str] | None = None, sample: bool = True,
              log: Callable[[str], None] | None = None, **overrides: Any) -> list[Head]:
    """``alignserve train all``: sample once (cached, resumable), then train every shipped head
    (or the ones in ``only``) into ``out_dir``. Returns the heads; logs the wall time."""
    log = log or (lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    cfgs = [c for c in shipped_configs(out_dir, **overrides) if not only or c.name in only]
    unknown = set(only or ()) - set(SHIPPED_HEADS)
    if unknown:
        raise ValueError(f"unknown head(s) {sorted(unknown)}; shipped: {sorted(SHIPPED_HEADS)}")
    for c in cfgs:  # every head's settings (its --out too), before the (long) sampling
        c.resolved()
    if sample and cfgs:
        sample_only(cfgs[0])  # every shipped head reads the same cache
        log(f"[train all] samples ready after {time.perf_counter() - t0:.0f}s")
    heads = [run_training(c, log) for c in cfgs]
    log(f"[train all] {len(heads)} heads in {time.perf_counter() - t0:.0f}s -> {out_dir}")
    return heads
