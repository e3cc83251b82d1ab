"""A compact Llama-family transformer that runs on our own slot-based KV cache.

Why not Hugging Face's module: the alignment strategies need forwards that ``generate()`` does not
offer — k candidate tokens scored on top of a shared prefix with a tree mask (all at the same
position, each seeing only the prefix and itself), rows of different lengths in one batch, and
cache rows that can be forked and rewritten in place. Owning the ~120 lines of the forward makes
those one tensor each. Logits are computed only for the positions a caller asks for, so a
prefill of P tokens does one vocabulary matmul, not P.

Supported ``model_type``: llama, mistral, qwen2 (q/k/v bias). Weights load from safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = {"llama", "mistral", "qwen2"}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        mtype = cfg.get("model_type", "?")
        if mtype not in SUPPORTED:
            raise ValueError(f"model_type {mtype!r} is not supported "
                             f"(supported: {sorted(SUPPORTED)})")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", None):
            raise ValueError(f"rope scaling {rtype!r} is not supported")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            qkv_bias=mtype == "qwen2" or bool(cfg.get("attention_bias", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused kernel (same formula)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rope_tables(cfg: ModelConfig, max_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float()
                                    / cfg.head_dim))
    t = torch.arange(max_len, device=device).float()
    freqs = torch.outer(t, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [..., H, D]; cos/sin: [..., D] gathered at each token's position (HF's half-split)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rot * sin.unsqueeze(-2)


@dataclass
class AttnGroup:
    """The rows of one attention call inside a packed forward.

    A packed forward runs every linear layer over all T real tokens of all rows at once
    ([T, D], no padding), and attention per group: the group's ``b`` rows padded to ``q``
    queries each. Its tokens are ``packed[start:end]`` in row-major order, real tokens only.

    rows: the cache slot of each of the b rows (a slice when contiguous); gather: [b*q] long,
    for each padded query the packed token it reads (None when the group has no padding);
    keep: [b*q - pads] long, the padded positions that are real tokens, in packed order (None
    without padding); mask: [b, 1, q, lk] bool, True = attend, or None when every query
    attends to all of the first ``lk`` cache entries of its row.
    """

    start: int
    end: int
    b: int
    q: int
    rows: Tensor | slice
    lk: int
    mask: Tensor | None = None
    gather: Tensor | None = None
    keep: Tensor | None = None


class KVCache:
    """Per-layer key/value storage by slot: ``k[layer]`` is [slots, max_len, kv_heads, D].

    A sequence owns one slot; position ``p`` of that sequence lives at index ``p`` (a packed
    forward writes only real tokens, so no column is reserved for padding). Memory is allocated
    with ``torch.zeros`` lazily touched pages, so unused slots cost little resident memory.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.slots, self.max_len = slots, max_len
        shape = (slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]

    def copy_rows(self, src: int, dst: Tensor | list[int], length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into each slot of ``dst`` (fork)."""
        dst_t = torch.as_tensor(dst, dtype=torch.long)
        if not len(dst_t):  # nothing to copy (indexing a 1-slot cache with [] would raise)
            return
        for k, v in zip(self.k, self.v):
            k[dst_t, :length] = k[src, :length]
            v[dst_t, :length] = v[src, :length]

    def move_position(self, slot: int, src_pos: int, dst_pos: int) -> None:
        """Move one position's entries inside a slot (commit a tree candidate to its place)."""
        if src_pos == dst_pos:
            return
        for k, v in zip(self.k, self.v):
            k[slot, dst_pos] = k[slot, src_pos]
            v[slot, dst_pos] = v[slot, src_pos]


def _onednn_pack(w: Tensor) -> Tensor | None:
    """A oneDNN-prepacked copy of a [out, in] fp32 CPU weight (the layout vLLM's CPU backend
    uses, packed for 32 rows), or None where oneDNN is unavailable."""
    if (w.device.type != "cpu" or w.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 32)
    except Exception:  # noqa: BLE001 - a torch build without these ops: plain matmul
        return None


def _onednn_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    shape = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), packed, bias,
                                           "none", [], "")
    return y.view(*shape[:-1], y.shape[-1])


# from this many rows a CPU fp32 matmul runs on the oneDNN-prepacked weight; below it on the
# transposed one (measured on SmolLM2, 1 thread: prepacked 12-18% faster per decode step at
# 8-16 rows, 25% slower at 1 row)
ONEDNN_MIN_ROWS = 4


class TLinear(nn.Module):
    """``x @ W^T + b`` with W stored transposed ([in, out], contiguous): on CPU the BLAS kernel
    for this layout is faster at the small row counts of decoding than ``F.linear``'s. On CPU
    in fp32, from ``ONEDNN_MIN_ROWS`` rows a oneDNN-prepacked copy (made on first use; one
    more copy of the weight in memory) is used instead."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.wt = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self._packed: Tensor | None = None
        self._pack_tried = False

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1] and x.device.type == "cpu":
            if not self._pack_tried:
                self._pack_tried = True
                self._packed = _onednn_pack(self.wt.t())
            if self._packed is not None:
                try:
                    return _onednn_linear(x, self._packed, self.bias)
                except RuntimeError:  # an input oneDNN rejects: the plain matmul from now on
                    self._packed = None
        y = x @ self.wt
        return y if self.bias is None else y + self.bias


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        # set by ``fuse``: q|k|v and gate|up concatenated (3 + 2 matmuls become 2 per layer)
        self.qkv_proj: TLinear | None = None
        self.gate_up_proj: TLinear | None = None

    @torch.no_grad()
    def fuse(self) -> None:
        """Concatenate the q/k/v and gate/up projections into two matmuls and store every
        projection transposed (``TLinear``); idempotent. The separate modules are dropped, so
        the HF-named state dict no longer loads after this."""
        if self.qkv_proj is not None:
            return
        qkv = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv_proj = TLinear(torch.cat([m.weight for m in qkv]),  # type: ignore[assignment]
                                torch.cat([m.bias for m in qkv]) if self.cfg.qkv_bias else None)
        self.gate_up_proj = TLinear(  # type: ignore[assignment]
            torch.cat([self.gate_proj.weight, self.up_proj.weight]), None)
        self.o_proj = TLinear(self.o_proj.weight, None)  # type: ignore[assignment]
        self.down_proj = TLinear(self.down_proj.weight, None)  # type: ignore[assignment]
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            delattr(self, name)

    def _qkv(self, hx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(hx), self.k_proj(hx), self.v_proj(hx)
        d = self.cfg.head_dim
        return self.qkv_proj(hx).split([self.cfg.num_heads * d, self.cfg.num_kv_heads * d,
                                        self.cfg.num_kv_heads * d], dim=-1)

    def _mlp(self, hx: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(hx)) * self.up_proj(hx))
        gate, up = self.gate_up_proj(hx).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor,
                slot_t: Tensor, write_t: Tensor, groups: list[AttnGroup]) -> Tensor:
        """x: [T, D] packed tokens; cos/sin: [T, head_dim]; slot_t/write_t: [T] the cache slot
        and index each token's key/value is written to."""
        cfg = self.cfg
        t = x.shape[0]
        hx = self.input_layernorm(x)
        qp, kp, vp = self._qkv(hx)
        qh = apply_rope(qp.view(t, cfg.num_heads, cfg.head_dim), cos, sin)
        kc[slot_t, write_t] = apply_rope(kp.view(t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        vc[slot_t, write_t] = vp.view(t, cfg.num_kv_heads, cfg.head_dim)
        outs = []
        for g in groups:
            qg = qh[g.start:g.end] if g.gather is None else qh[g.gather]
            att = F.scaled_dot_product_attention(
                qg.view(g.b, g.q, cfg.num_heads, cfg.head_dim).transpose(1, 2),
                kc[g.rows, :g.lk].transpose(1, 2), vc[g.rows, :g.lk].transpose(1, 2),
                attn_mask=g.mask, enable_gqa=cfg.num_heads != cfg.num_kv_heads)
            att = att.transpose(1, 2).reshape(g.b * g.q, -1)
            outs.append(att if g.keep is None else att[g.keep])
        x = x + self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))
        hx = self.post_attention_layernorm(x)
        return x + self._mlp(hx)


class CausalLM(nn.Module):
    """The transformer body plus the (possibly tied) LM head, split so logits are on demand."""

    def __init__(self, cfg: ModelConfig, rope_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False)
        self._head_t: Tensor | None = None  # CPU copies of the LM head made by ``logits``
        self._head_packed: Tensor | None = None
        self._pack_tried = False
        cos, sin = rope_tables(cfg, rope_len, torch.device("cpu"))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def fuse(self) -> CausalLM:
        """Fuse every layer's projections (``Block.fuse``); call after the weights are loaded."""
        for layer in self.layers:
            layer.fuse()  # type: ignore[operator]
        return self

    @property
    def head_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: Tensor) -> Tensor:
        """[M, D] final hidden states -> [M, V] float32 logits.

        On CPU (fp32) the vocabulary matmul is the largest one of a decode step. From
        ``ONEDNN_MIN_ROWS`` rows on it runs on a oneDNN-prepacked copy of the head (measured
        about 2x faster than the plain matmul at 8 rows on SmolLM2's 49152 x 576 head), below
        that on a transposed copy; both are made on first use. Elsewhere a plain matmul.
        """
        w = self.head_weight
        if hidden.device.type != "cpu" or w.dtype != torch.float32 or hidden.dim() != 2:
            return (hidden @ w.T).float()
        if hidden.shape[0] >= ONEDNN_MIN_ROWS:
            if not self._pack_tried:
                self._pack_tried = True
                self._head_packed = _onednn_pack(w)
            if self._head_packed is not None:
                try:
                    return _onednn_linear(hidden, self._head_packed, None)
                except RuntimeError:
                    self._head_packed = None
        if self._head_t is None:
            self._head_t = w.detach().t().contiguous()
        return hidden @ self._head_t

    @torch.inference_mode()
    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, slot_t: Tensor,
                write_t: Tensor, groups: list[AttnGroup]) -> Tensor:
        """Run the body over packed tokens; returns final-normed hidden states [T, D].

        tokens/positions/slot_t/write_t: [T] long: the real tokens of every row, back to back
        in the order of ``groups``; each token's rotary position, and the cache slot and index
        its key/value is written to (a tree candidate's position differs from its index).
        Linear layers run once over all T tokens; attention once per ``AttnGroup``.
        """
        x = self.embed_tokens(tokens)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], slot_t, write_t, groups)
        return self.norm(x)


def load_causal_lm(model_dir: Path, dtype: torch.dtype = torch.float32,
                   max_len: int = 2048,
                   num_layers: int | None = None) -> tuple[CausalLM, ModelConfig]:
    """Build the module from ``config.json`` and load safetensors weights (strict).

    ``num_layers`` keeps only the first layers: a cheap backbone of the same model (its own KV
    cache, same tokenizer) for guidance heads that should not read the full model's states.
    """
    from safetensors.torch import load_file

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = ModelConfig.from_hf(raw)
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_layers:
            raise ValueError(f"num_layers must be in [1, {cfg.num_layers}], got {num_layers}")
        cfg.num_layers = num_layers
    model = CausalLM(cfg, rope_len=max(max_len + 1, 16))
    state: dict[str, Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            k = k.removeprefix("model.")
            k = k.replace("self_attn.", "").replace("mlp.", "")
            if k.startswith("layers.") and int(k.split(".")[1]) >= cfg.num_layers:
                continue
            state[k] = v
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("rope_")]
    if missing or unexpected:
        raise ValueError(f"weights do not match config: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]}")
    model = model.to(dtype).eval()
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.fuse(), cfg
