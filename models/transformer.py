"""The reference Transformer: a small decoder-only language model whose attention is longattn's.

Read top to bottom: the config, the positional encodings, the KV cache, RMSNorm, the SwiGLU MLP,
the attention layer (the one place the normalizer is chosen), a block, the model with its
KV-cache generation, and checkpoints. Tensors are `(B, T, C)` in the residual stream and `(B, H, T, D)`
inside attention, as `longattn.scaled_dot_product_attention` takes them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from longattn.attention import ScaledDotProductAttention, attention_weights, checks, normalizers
from longattn.attention.modules import LEARNABLE, alpha_logit

POSITIONAL = ("rope", "partial_rope", "nope", "alibi")


@dataclass
class TransformerConfig:
    vocab_size: int = 512        # every token id of the task, specials included
    d_model: int = 64            # residual width
    n_layer: int = 2             # two layers are enough for an induction (look-up) circuit
    n_head: int = 4              # query heads
    n_kv_head: int = 2           # key/value heads (GQA); divides n_head
    mlp_hidden: int = 0          # SwiGLU width; 0 means 8/3 * d_model rounded up to 16
    positional: str = "partial_rope"  # "rope", "partial_rope", "nope" or "alibi"
    rope_fraction: float = 0.5   # share of each head's dims that rotate, for "partial_rope"
    rope_base: float = 10000.0   # RoPE's base wavelength
    token_shift: bool = False    # add a learned map of the previous token's embedding to each
                                 # position (RWKV's token shift), so a look-up needs no
                                 # previous-token attention head and small models learn it fast
    normalizer: str = "softmax"  # a registered name: "softmax", "ssmax", "sparsemax", "entmax", ...
    alpha: float | str = 1.5     # entmax's alpha, or "learnable": one per head (initial_alpha at first)
    length_scale: float | None = None  # initial s of length scaling (None: none; 1.0 for ssmax)
    learn_length_scale: bool = True    # s is a per-head Parameter
    sliding_window: int | None = None  # each position sees itself and the w - 1 before (Mistral's)
    backend: str = "auto"        # longattn backend: "auto", "reference", "torch", "triton", "flash"
    initial_alpha: float = 1.5   # where a learnable alpha starts

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden must be a non-negative int; got {self.mlp_hidden!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        checks.check_choice("positional", self.positional, POSITIONAL)
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool)
                or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be None or a positive int; got {self.sliding_window!r}")
        if self.positional in ("rope", "partial_rope") and self.d_model // self.n_head % 2:
            raise ValueError(f"RoPE needs an even head dim; got {self.d_model // self.n_head}")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction must be in (0, 1]; got {self.rope_fraction!r}")
        if self.rope_base <= 1.0:
            raise ValueError(f"rope_base must be > 1; got {self.rope_base!r}")
        checks.check_normalizer(self.normalizer)
        if self.alpha == LEARNABLE:
            if not normalizers.get(self.normalizer).takes_alpha:
                raise ValueError(f"alpha='learnable' is for normalizer='entmax'; got {self.normalizer!r}")
            alpha_logit(self.initial_alpha)  # checks it
        else:
            checks.check_alpha(self.alpha)
        s = self.length_scale
        if s is not None and not (checks.is_real_number(s) and s > 0):
            raise ValueError(f"length_scale must be None or a positive float; got {self.length_scale!r}")
        checks.check_backend(self.backend)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        """Dims per head that RoPE rotates (even); the rest carry no position (NoPE)."""
        if self.positional == "rope":
            return self.head_dim
        if self.positional == "partial_rope":
            return max(2, int(self.head_dim * self.rope_fraction) // 2 * 2)
        return 0


# ---------------------------------------------------------------------------------------------
# Positional encodings


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """RoPE on the first `rotary_dim` dims of `x` (B, H, T, D) at integer `positions` (T,).

    Pairs `(x[2i], x[2i+1])` turn by `position * base ** (-2i / rotary_dim)`; the other dims pass
    through untouched, which is partial RoPE when `rotary_dim < D`.
    """
    if rotary_dim == 0:
        return x
    freqs = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=x.device) / rotary_dim)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # (T, rotary_dim / 2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((turned, rest), dim=-1)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Press et al. 2022: head h gets slope 2 ** (-8 (h + 1) / H), a geometric set of distances."""
    return 2.0 ** (-8.0 * torch.arange(1, n_head + 1, dtype=torch.float64) / n_head)


# ---------------------------------------------------------------------------------------------
# The KV cache


class KVCache:
    """The keys and values of every position seen so far, per layer, `(B, Hkv, T, D)` (after
    RoPE), and the last position's token embedding for token shift. `model(idx, cache)` reads
    and extends it; `length` is the next position."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.last_embedding: torch.Tensor | None = None  # (B, 1, C)

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the new positions' `k`, `v` of `layer`; returns all of that layer's."""
        if self.keys[layer] is not None:
            k, v = torch.cat((self.keys[layer], k), dim=2), torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


# ---------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.mlp_hidden or -(-8 * config.d_model // 3 // 16) * 16
        self.gate = nn.Linear(config.d_model, hidden, bias=False)
        self.up = nn.Linear(config.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """Causal GQA self-attention through longattn, with RoPE or ALiBi and a KV cache.

    Asked for `rows` (query positions), the forward also returns the attention weights of
    those rows, `(B, Hq, len(rows), Nk)`: the study's measure of fading. They come from the
    same q, k and mask through `longattn.attention.attention_weights` (the reference), one
    row at a time, so the cost is O(N) per row.
    """

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.d_model, 2 * config.n_kv_head * config.head_dim, bias=False)
        self.out_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        # The one place the normalizer is chosen; it owns the learnable per-head s.
        self.attend = ScaledDotProductAttention(
            config.normalizer, config.n_head, config.alpha, config.length_scale,
            config.learn_length_scale, config.backend, config.initial_alpha,
        )
        if config.positional == "alibi":
            self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)

    def forward(self, x: torch.Tensor, start: int, cache: KVCache | None, rows: list[int] | None = None,
                context_parallel=None):
        """`x` (B, T, C) holds positions `start .. start + T - 1`; `cache` (or None) holds the
        keys and values of positions `0 .. start - 1` and is extended. Returns `(B, T, C)` and
        the weights of the rows at positions `rows` (None without). With `context_parallel`,
        `x` is this rank's shard of one causal sequence (`Transformer.forward`)."""
        c = self.config
        if context_parallel is not None:
            positions = context_parallel.positions(x.shape[1], x.device)
        else:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.n_head)
        k, v = rearrange(self.kv_proj(x), "b t (two h d) -> two b h t d", two=2, h=self.n_kv_head)
        q = rotate(q, positions, c.rotary_dim, c.rope_base)
        k = rotate(k, positions, c.rotary_dim, c.rope_base)
        gqa = self.n_head != self.n_kv_head
        if context_parallel is not None:  # the causal mask over the whole sequence, every rank's keys
            y = self.attend(q, k, v, enable_gqa=gqa, is_causal=True, context_parallel=context_parallel)
            return self.out_proj(rearrange(y, "b h t d -> b t (h d)")), None
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # Query row i sits at position start + i: it may see keys j <= i + start (bottom-right),
        # so SSMax's n_i is the same whether the prefix came from the cache or not. ALiBi's
        # distances, `i + start - j`, count from that diagonal too: the kernels compute them.
        offset = k.shape[2] - x.shape[1]
        window = None if c.sliding_window is None else (c.sliding_window - 1, 0)
        slopes = self.slopes if c.positional == "alibi" else None
        y = self.attend(q, k, v, enable_gqa=gqa, causal_offset=offset, window_size=window,
                        alibi_slopes=slopes)
        weights = None
        if rows is not None:
            weights = self.weights_of_rows(q, k, offset, [r - start for r in rows], window, slopes)
        return self.out_proj(rearrange(y, "b h t d -> b t (h d)")), weights

    @torch.no_grad()
    def weights_of_rows(self, q, k, offset: int, rows: list[int], window=None, slopes=None) -> torch.Tensor:
        """Attention weights of query rows `rows` (indices into `q`), (B, Hq, len(rows), Nk),
        computed in float64."""
        a = self.attend
        out = [
            attention_weights(
                q[:, :, r:r + 1].double(), k.double(), enable_gqa=self.n_head != self.n_kv_head,
                causal_offset=offset + r, normalizer=a.normalizer, alpha=a.alpha, length_scale=a.length_scale,
                window_size=window, alibi_slopes=slopes,
            )
            for r in rows
        ]
        return torch.cat(out, dim=2).float()


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(config.d_model), Attention(config, layer)
        self.mlp_norm, self.mlp = RMSNorm(config.d_model), SwiGLU(config)

    def forward(self, x, start, cache, rows=None, context_parallel=None):
        h, weights = self.attn(self.attn_norm(x), start, cache, rows, context_parallel)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), weights


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.shift = nn.Linear(config.d_model, config.d_model, bias=False) if config.token_shift else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model)
        # Weights at std 1/sqrt(fan_in), so attention logits and tied output logits start near
        # unit scale (nanoGPT's fixed 0.02 is that for width 2500; at width 64 it leaves every
        # logit near 0 and look-up circuits take far longer to form); residual branches smaller.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)
            if name.endswith(("out_proj.weight", "down.weight")):
                p.data /= math.sqrt(2 * config.n_layer)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                attention_rows: list[int] | None = None, context_parallel=None):
        """Token ids `idx` (B, T) -> logits (B, T, vocab). With `cache` (from `new_cache`), `idx`
        continues the tokens already cached, and the cache grows by T. With `attention_rows`
        (positions), returns `(logits, weights)`: per layer, the attention weights of those rows,
        `(B, Hq, len(rows), Nk)`, for measuring attention; the model keeps no state of them.

        With `context_parallel` (a `longattn.distributed.ContextParallel`), `idx` is the whole
        sequence on every rank (token ids cost little) and the logits are this rank's shard,
        `(B, T / P, vocab)` in `context_parallel.shard` order: each rank embeds and runs its own
        positions, and attention runs context-parallel (RoPE at the global positions)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T); got {tuple(idx.shape)}")
        if context_parallel is not None:
            return self._forward_context_parallel(idx, cache, attention_rows, context_parallel)
        start = 0 if cache is None else cache.length
        x = self.embed(idx)  # (B, T, C)
        if self.shift is not None:  # position t also sees token t - 1 (the cache keeps the last)
            first = x.new_zeros(x[:, :1].shape) if start == 0 else cache.last_embedding
            if cache is not None:
                cache.last_embedding = x[:, -1:]
            x = x + self.shift(torch.cat((first, x[:, :-1]), dim=1))
        weights = []
        for block in self.blocks:
            x, w = block(x, start, cache, attention_rows)
            weights.append(w)
        logits = self.norm(x) @ self.embed.weight.T  # tied embeddings
        return logits if attention_rows is None else (logits, weights)

    def _forward_context_parallel(self, idx, cache, attention_rows, cp):
        c = self.config
        refused = [name for name, given in [
            ("cache", cache is not None), ("attention_rows", attention_rows is not None),
            ("sliding_window", c.sliding_window is not None), ("positional='alibi'", c.positional == "alibi"),
        ] if given]
        if refused:
            raise ValueError(f"context-parallel forward takes no {', '.join(refused)}: it runs one whole "
                             "causal sequence, with RoPE or NoPE")
        x = self.embed(cp.shard(idx, dim=1))  # (B, T / P, C): this rank's tokens
        if self.shift is not None:  # token t - 1 of each position, from the whole sequence's ids
            before = self.embed(cp.shard(torch.cat((idx[:, :1], idx[:, :-1]), dim=1), dim=1))
            first = (cp.positions(x.shape[1], x.device) == 0).view(1, -1, 1)
            x = x + self.shift(before.masked_fill(first, 0.0))
        for block in self.blocks:
            x, _ = block(x, 0, None, None, cp)
        return self.norm(x) @ self.embed.weight.T

    def new_cache(self) -> KVCache:
        """An empty cache for `forward` and `generate`."""
        return KVCache(len(self.blocks))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continues `idx` (B, T) by `max_new_tokens`, greedily when `temperature` is 0, with a KV
        cache: one forward over the prompt, then one token at a time."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int; got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {temperature!r}")
        cache = self.new_cache()
        logits = self(idx, cache)[:, -1]
        out = [idx]
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            out.append(token)
            logits = self(token, cache)[:, -1]
        return torch.cat(out, dim=1)

    def save(self, path) -> None:
        torch.save({"config": asdict(self.config), "model": self.state_dict()}, path)

    @classmethod
    def load(cls, path, **overrides) -> Transformer:
        """A saved model; `overrides` replace config fields (e.g. `backend="reference"`)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        known = {f.name for f in fields(TransformerConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown config field(s) in overrides: {sorted(unknown)}")
        model = cls(TransformerConfig(**{**saved["config"], **overrides}))
        model.to(next(iter(saved["model"].values())).dtype)  # keep the saved precision
        model.load_state_dict(saved["model"])
        return model
