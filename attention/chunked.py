"""backend="torch": attention in plain PyTorch that never builds the `(Nq, Nk)` score matrix.

- Softmax and SSMax call torch's fused SDPA (`softmax_attention`). SSMax's per-row factor
  `s_h * ln(n_i)` is folded into the query, so the learnable `s` gets its gradient through
  autograd.
- Sparsemax and alpha-entmax (`entmax_attention`) walk over blocks of query rows, holding one
  `(rows, Nk)` block of logits at a time. Each row's threshold `tau` is found by Newton's method
  (below) and saved, O(N), for a backward that recomputes each block from it. A tensor alpha
  (one per query head) gets its gradient here too.

Both take a dense `AttentionCall` (`attention/call.py`). The semantics are those of
`reference.py`; the tests hold the two together.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..kernels.common import first_order_only, vmap_by_loop  # host side only: compiles no kernel
from .reference import alibi_bias, float_mask_allows

if TYPE_CHECKING:
    from .call import AttentionCall

# A logits block holds about this many elements (4 MiB in float32): big enough for BLAS, small
# enough for cache; and at least this many query rows, so the matmuls are not starved.
BLOCK_ELEMENTS = 1 << 20
MIN_BLOCK_ROWS = 32
# The threshold search takes 3 to 11 passes on the inputs we measured (`entmax_threshold`);
# the cap only guards against pathological rounding.
MAX_NEWTON_STEPS = 30
# For alpha other than 1.5 and 2, the threshold search moves to the keys above its lower bound
# when they are at most this fraction of the block (see `entmax_threshold`).
COMPACT_FRACTION = 0.25
# The blockwise path runs softmax as entmax's limit alpha -> 1 (weights exp(z - max - tau), tau the
# log-sum-exp), for the logits SDPA cannot take; the public alpha starts at 1.01.
SOFTMAX_ALPHA = 1.0


def softmax_attention(call: AttentionCall) -> torch.Tensor:
    """Softmax (and SSMax, with a length scale) by torch's fused SDPA, in row blocks where SDPA
    cannot take the causal rule; with what SDPA cannot apply to the logits (softcapping, ALiBi
    without a dense bias, sinks), by the blockwise path below at `alpha = 1`."""
    if call.softcap is not None or call.alibi_slopes is not None or call.sink is not None:
        return _blockwise(call, SOFTMAX_ALPHA)
    return _softmax_sdpa(call.query, call.key, call.value, call.attn_mask, call.dropout_p, call.causal_offset,
                         call.window_offset, call.scale, call.length_scale)


def entmax_attention(call: AttentionCall) -> torch.Tensor:
    """Sparsemax / alpha-entmax blockwise, O(N) extra memory per row block; a tensor alpha is
    one per query head, with its gradient."""
    return _blockwise(call, call.alpha)


def _blockwise(call: AttentionCall, alpha) -> torch.Tensor:
    q = call.query
    s = None if call.length_scale is None else _per_head(call.length_scale, q)
    alphas = _per_head(alpha, q) if isinstance(alpha, torch.Tensor) else None
    out, _, _, _ = SparseAttention.apply(q, call.key, call.value, s, alphas, call.attn_mask, call.sink,
                                         call.alibi_slopes,
                                         call.causal_offset, call.window_offset, call.scale,
                                         0.0 if alphas is not None else alpha,
                                         call.dropout_p, call.softcap, call.alibi_offset)
    return out


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_head(value, q):
    """`s` or alpha as an `(Hq,)` tensor in the compute dtype; autograd reaches a tensor one."""
    s = torch.as_tensor(value, dtype=_compute_dtype(q), device=q.device)
    return s.expand(q.shape[1])


def _is(alpha, value: float) -> bool:
    """Whether `alpha` is the float `value` (a tensor of alphas, one per head, never is: its
    heads take the general path)."""
    return not isinstance(alpha, torch.Tensor) and alpha == value


# ---------------------------------------------------------------------------------------------
# Masks: which keys each row may attend to, one block of rows at a time


def _mask_4d(attn_mask):
    return None if attn_mask is None else attn_mask[(None,) * (4 - attn_mask.dim())]


def _band_block(causal_offset, window_offset, r0, r1, k0, k1, device):
    """`(rows, keys)` for rows `r0:r1` and keys `k0:k1`: key j allowed for row i iff
    `i + window_offset <= j <= i + causal_offset` (a bound that is None: none), or None when
    neither bound is set."""
    if causal_offset is None and window_offset is None:
        return None
    gap = torch.arange(k0, k1, device=device).view(1, -1) - torch.arange(r0, r1, device=device).view(-1, 1)
    if causal_offset is None:
        return gap >= window_offset
    allowed = gap <= causal_offset
    return allowed if window_offset is None else allowed & (gap >= window_offset)


def _key_range(causal_offset, window_offset, r0, r1, n_k):
    """`(k0, k1)`: rows `r0:r1` see only keys in `[k0, k1)`, the causal rule and the window
    leaving out the rest (`k0 == k1`: none)."""
    k1 = n_k if causal_offset is None else max(0, min(n_k, r1 + causal_offset))
    k0 = 0 if window_offset is None else max(0, min(n_k, r0 + window_offset))
    return min(k0, k1), k1


def _keys_of(t, k0, k1):
    """Keys `k0:k1` of a mask (or its gradient) shaped `(..., Nk)`, which may broadcast along them."""
    return t if t.shape[-1] == 1 else t[..., k0:k1]


def _rows_per_block(elements, n_k, causal_offset, window_offset):
    """Query rows per block, so that `rows x keys` holds about `elements`: with both bounds, a
    block of r rows sees `r + band - 1` keys (`band` = the keys a row may see)."""
    if causal_offset is None or window_offset is None:
        return max(MIN_BLOCK_ROWS, elements // max(1, n_k))
    band = max(1, causal_offset - window_offset + 1)
    rows = (math.isqrt((band - 1) ** 2 + 4 * elements) - (band - 1)) // 2  # r (r + band - 1) = elements
    return max(MIN_BLOCK_ROWS, rows, elements // max(1, n_k))


def _allowed_block(mask4, causal_offset, window_offset, r0, r1, n_k, device):
    """Bool `(Bm, Hm, rows, n_k)` or `(rows, n_k)` of allowed keys for rows `r0:r1`, or None if all are."""
    allowed = _band_block(causal_offset, window_offset, r0, r1, 0, n_k, device)
    if mask4 is not None:
        blk = mask4[:, :, r0:r1] if mask4.shape[2] > 1 else mask4
        blk = blk if blk.dtype == torch.bool else float_mask_allows(blk)
        allowed = blk if allowed is None else blk & allowed
    return allowed


def allowed_counts(attn_mask, causal_offset, n_q, n_k, device, window_offset=None):
    """`n_i`, the keys row i may attend to, as float `(Bm, Hm, Nq)` (broadcastable to B, Hq)."""
    mask4 = _mask_4d(attn_mask)
    if mask4 is None:
        rows = torch.arange(n_q, device=device, dtype=torch.float64)
        hi = torch.full_like(rows, n_k) if causal_offset is None else (rows + 1 + causal_offset).clamp(0, n_k)
        lo = 0 if window_offset is None else (rows + window_offset).clamp(0, n_k)
        return (hi - lo).clamp(min=0).view(1, 1, n_q)
    b_m, h_m = mask4.shape[:2]
    counts = torch.empty(b_m, h_m, n_q, device=device, dtype=torch.float64)
    step = max(1, BLOCK_ELEMENTS // max(1, b_m * h_m * n_k))
    for r0 in range(0, n_q, step):
        r1 = min(n_q, r0 + step)
        allowed = _allowed_block(mask4, causal_offset, window_offset, r0, r1, n_k, device)
        counts[:, :, r0:r1] = allowed.expand(b_m, h_m, r1 - r0, n_k).sum(-1)
    return counts


def length_factor(s, counts, num_heads):
    """`s_h * ln(n_i)` as `(B or 1, Hq, Nq, 1)`; an empty row (n = 0) gets 0, as n = 1 does."""
    counts = counts.expand(counts.shape[0], num_heads, counts.shape[2])
    return (s.view(1, -1, 1) * torch.log(counts.clamp(min=1)).to(s.dtype)).unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# Softmax and SSMax: torch's fused SDPA


def _softmax_sdpa(q, k, v, attn_mask, dropout_p, causal_offset, window_offset, scale, length_scale):
    out_dtype = q.dtype
    # SDPA's own call (no factor to fold in, a mask SDPA would take as it is) runs in the inputs'
    # dtype, as torch runs it; anything longattn adds is computed in float32, as the reference is:
    # folding `s ln(n)` into a half-precision query would round it to 8 or 11 bits.
    sdpas_own = length_scale is None and (attn_mask is None or attn_mask.dtype in (torch.bool, q.dtype))
    work = q.dtype if sdpas_own else _compute_dtype(q)
    if length_scale is not None:
        counts = allowed_counts(attn_mask, causal_offset, q.shape[2], k.shape[2], q.device, window_offset)
        q = q.to(work) * length_factor(_per_head(length_scale, q), counts, q.shape[1])
    q, k, v = (t.to(work) for t in (q, k, v))
    mask4 = _sdpa_mask(attn_mask, work)
    gqa = q.shape[1] != k.shape[1]
    if window_offset is None and (causal_offset is None or (causal_offset == 0 and mask4 is None)):
        out = F.scaled_dot_product_attention(q, k, v, mask4, dropout_p, causal_offset == 0, scale=scale,
                                             enable_gqa=gqa)
        return out.to(out_dtype)
    # SDPA's causal flag is top-left only, and its math fallback refuses it beside a mask;
    # folding the rule into a (.., 1, Nk) padding mask would build an (Nq, Nk) one. Go by row
    # blocks instead, each with its own slice of the causal rule and the window: the keys
    # outside a block's band are never read.
    n_q, n_k = q.shape[2], k.shape[2]
    rows = _rows_per_block(BLOCK_ELEMENTS, n_k, causal_offset, window_offset)
    outs = []
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        k0, k1 = _key_range(causal_offset, window_offset, r0, r1, n_k)
        if k0 == k1:  # rows that see no key keep one, masked: SDPA gives them 0 and a zero gradient
            k0, k1 = min(k0, n_k - 1), min(k0, n_k - 1) + 1
        mask = _band_block(causal_offset, window_offset, r0, r1, k0, k1, q.device)
        if mask4 is not None:
            blk = _keys_of(mask4[:, :, r0:r1] if mask4.shape[2] > 1 else mask4, k0, k1)
            mask = blk & mask if blk.dtype == torch.bool else blk.masked_fill(~mask, float("-inf"))
        outs.append(F.scaled_dot_product_attention(
            q[:, :, r0:r1], k[:, :, k0:k1], v[:, :, k0:k1], mask, dropout_p, scale=scale, enable_gqa=gqa
        ))
    return torch.cat(outs, dim=2).to(out_dtype)


def _sdpa_mask(attn_mask, dtype):
    """The mask as SDPA takes it: 4-D (SDPA's CPU kernel refuses fewer dims), a float one in the
    dtype SDPA adds it in, with its masked entries (`float_mask_allows`) at -inf."""
    mask4 = _mask_4d(attn_mask)
    if mask4 is None or mask4.dtype == torch.bool:
        return mask4
    return mask4.to(dtype).masked_fill(~float_mask_allows(mask4), float("-inf"))


# ---------------------------------------------------------------------------------------------
# Sparsemax and alpha-entmax: blockwise, with the threshold found by Newton's method


def entmax_threshold(x, alpha, empty, work, pack=False, buffers=None):
    """`tau` per row with `sum_j [x_j - tau]_+ ** (1/(alpha-1)) = 1`, for rows whose max is 0.

    Newton's method on `G(t) = || [x - t]_+ ||_p = 1`, `p = 1 / (alpha - 1)`, from `t = -1`
    (the root lies in `[-1, -n ** (1 - alpha)]`): `G` is convex and decreasing, so from the
    left every step stays left of the root, and convergence is monotone and quadratic; the p-th
    root makes `G` nearly linear, so it takes few steps. Passes over the block, the last one
    confirming, in float32 at N = 4096 for logits ~ N(0, 1): 6 (1.5), 7 (2); 3 to 11 from
    nearly flat rows to peaked ones (`tests/test_chunked.py`); plain Newton on `G ** p` needs
    up to 3 more. For sparsemax each step is Michelot's exact support refinement, and for
    alpha = 1.5 a last step solves the quadratic on the support exactly.

    Other alpha need a `pow` per element and step, 14 times the cost of a subtraction here. So
    they start with Newton on the integer power `m = ceil(p)` (`_integer_bound`: products, no
    pow), whose iterates stay left of its root, which lies left of ours (`d ** m <= d ** p` on
    `[0, 1]`); the keys above that bound hold the support, about 7% of them at alpha 1.3 and N
    = 4096 (the support is 4.5%), and where they are few (`COMPACT_FRACTION`) the pow steps run
    on them alone, packed (`_Candidates`).

    `empty` marks rows with no key (the caller zeroes them); `work` is a buffer shaped like
    `x`. `alpha` is a float or a tensor of them that broadcasts against the rows (`x[..., :1]`);
    `buffers` (a `_Buffers`) holds the temporaries. Returns (tau, passes over the whole block)
    and, with `pack`, the packed candidates (or None where the steps ran on the whole block).
    """
    buffers = buffers or _Buffers(x.device)
    t = torch.full(x.shape[:-1] + (1,), -1.0, dtype=x.dtype, device=x.device)
    packed, step = None, 0
    if not (_is(alpha, 1.5) or _is(alpha, 2.0)):
        t, step = _integer_bound(x, alpha, empty, work, t, buffers)
        # rounding may have carried t a hair past the bound
        candidates = torch.gt(x, t - _tolerance(x), out=buffers("candidates", x.shape, torch.bool))
        # counted first: `nonzero` costs 5 times as much, wasted where the candidates are many
        if int(candidates.count_nonzero()) <= COMPACT_FRACTION * x.numel():
            packed = _Candidates.of(x, candidates.view(-1).nonzero().squeeze(1))
            t = packed.threshold(alpha, empty, t)
            return (t, step + 1, packed) if pack else (t, step + 1)
    first = step
    for step in range(first + 1, first + MAX_NEWTON_STEPS + 1):  # noqa: B007 (the passes are returned)
        delta = _newton_step(torch.sub(x, t, out=work).clamp_(min=0), alpha, empty, buffers)
        t += delta
        if not bool((delta.abs() > _tolerance(x)).any()):  # NaN rows never hold the loop
            break
    if _is(alpha, 1.5):  # solve sum_S (x_j - tau)^2 = 1 exactly on the support S found above
        d = torch.sub(x, t, out=work).clamp_(min=0)
        s2 = _row_dot(d, d, buffers)
        s1 = d.sum(-1, keepdim=True)
        size = d.sign_().sum(-1, keepdim=True)
        t += (s1 - torch.sqrt((s1 * s1 - size * (s2 - 1)).clamp(min=0))) / size
    return (t, step, packed) if pack else (t, step)


# Newton steps on the integer power before the candidates are taken: the first lifts the bound
# from -1 and leaves 11% of the keys at alpha 1.3 (N = 4096, logits N(0, 1)), the second 7%,
# a third hardly fewer.
BOUND_STEPS = 2


def _integer_bound(x, alpha, empty, work, t, buffers):
    """`(t, passes)`: `BOUND_STEPS` of Newton from `t` on `|| [x - t]_+ ||_m = 1`, `m = ceil(p)`
    over every alpha of the block (at least 2), with `d ** (m - 1)` by repeated products. For
    `d` in [0, 1] (`x <= 0`, `t >= -1`) `d ** m <= d ** p`, so its root, and every iterate, lie
    left of tau: a lower bound."""
    p = 1.0 / (alpha - 1.0)
    p_max = float(p.max()) if isinstance(p, torch.Tensor) else p
    m = max(2, math.ceil(p_max - 1e-9))
    for step in range(1, BOUND_STEPS + 1):
        d = torch.sub(x, t, out=work).clamp_(min=0)
        d_m1 = _integer_power(d, m - 1, buffers)
        mass, slope = _row_dot(d_m1, d, buffers), d_m1.sum(-1, keepdim=True)
        delta = ((mass - mass.pow(1.0 - 1.0 / m)) / slope).masked_fill_(empty, 0.0)
        t = t + delta
        if not bool((delta.abs() > _tolerance(x)).any()):
            return t, step
    return t, BOUND_STEPS


def _integer_power(d, n: int, buffers):
    """`d ** n` for an int `n >= 1` by repeated squaring: products only, into `buffers`."""
    result, base = None, d
    while True:
        if n & 1:
            power = buffers("power", d.shape, d.dtype)
            if result is None:
                result = base if base is d else power.copy_(base)
            else:
                result = torch.mul(result, base, out=power)
        n >>= 1
        if not n:
            return result
        base = torch.mul(base, base, out=buffers("square", d.shape, d.dtype))


class _Candidates:
    """The keys of a block that may hold weight, packed to the left of each row: `values`
    (`x.shape[:-1] + (K,)`, K the most any row has, padded with -inf), where each came from
    (`source`, flat positions in x) and went (`target`, flat positions in `values`), and how
    many each row has (`counts`). Steps on them cost K / Nk of a step on the block, and no
    index per key (each row is whole)."""

    def __init__(self, values, source, target, counts, n_keys):
        self.values, self.source, self.target, self.counts = values, source, target, counts
        self.n_keys = n_keys  # the block's row length

    @classmethod
    def of(cls, x, source):
        """The candidates at `source`, the flat positions in `x` of the keys kept."""
        n = x.shape[-1]
        rows = torch.div(source, n, rounding_mode="floor")
        counts = torch.bincount(rows, minlength=x.numel() // n)  # a bool sum would copy to int64
        width = max(1, int(counts.max())) if counts.numel() else 1
        starts = counts.cumsum(0) - counts
        target = rows * width + (torch.arange(source.numel(), device=x.device) - starts[rows])
        values = x.new_full(x.shape[:-1] + (width,), float("-inf"))
        values.view(-1).index_copy_(0, target, x.reshape(-1).take(source))
        return cls(values, source, target, counts, n)

    def threshold(self, alpha, empty, t):
        """Newton from `t` (left of the root) on the packed keys."""
        buffers = _Buffers(self.values.device)
        for _ in range(MAX_NEWTON_STEPS):
            delta = _newton_step((self.values - t).clamp_(min=0), alpha, empty, buffers)
            t = t + delta
            if not bool((delta.abs() > _tolerance(self.values)).any()):
                break
        return t

    def packed_weights(self, tau, alpha):
        """The normalised weights `[x - tau]_+ ** p` of the packed keys (0 in the padding)."""
        w = (self.values - tau).clamp_(min=0).pow_(1.0 / (alpha - 1.0))
        return w.div_(w.sum(-1, keepdim=True).clamp_(min=torch.finfo(w.dtype).tiny))

    def weights(self, tau, alpha, out):
        """The normalised weights in `out` (shaped like the block's logits), zero off the
        candidates; NaN in rows whose tau is NaN."""
        p = out.zero_()
        p.view(-1).index_copy_(0, self.source, self.packed_weights(tau, alpha).view(-1).take(self.target))
        nan_rows = torch.isnan(tau)
        return p.masked_fill_(nan_rows, float("nan")) if bool(nan_rows.any()) else p

    def attend(self, tau, alpha, v):
        """`p @ v` per head, `(heads, G * rows, Dv)` from `v` `(heads, keys, Dv)`: each head's
        weights as a sparse CSR matrix of its candidates (MKL's sparse product took 0.37 ms
        where the dense one took 0.78 ms and the scatter into it 0.08, at 7% of 4096 keys)."""
        keys = torch.remainder(self.source, self.n_keys)
        w = self.packed_weights(tau, alpha).view(-1).take(self.target)
        rows_per_head = self.counts.numel() // v.shape[0]
        ends = torch.cat((self.counts.new_zeros(1), self.counts.cumsum(0)))
        bounds = ends[::rows_per_head].tolist()
        outs = []
        with warnings.catch_warnings():  # torch's note that its CSR tensors are in beta, once a process
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            for h in range(v.shape[0]):
                a, b = bounds[h], bounds[h + 1]
                crow = ends[h * rows_per_head:(h + 1) * rows_per_head + 1] - a
                weights = torch.sparse_csr_tensor(crow, keys[a:b], w[a:b], size=(rows_per_head, v.shape[-2]),
                                                  check_invariants=False)  # sound by construction
                outs.append(weights @ v[h])
        return torch.stack(outs)


def _tolerance(x):
    return 1e-12 if x.dtype == torch.float64 else 1e-6


def _newton_step(d, alpha, empty, buffers=None):
    """The Newton step on `G` at `t`, from `d = [x - t]_+` (overwritten); a tensor `alpha`
    broadcasts against `d`. `buffers` (a `_Buffers`) holds the temporaries."""
    buffers = buffers or _Buffers(d.device)
    p = 1.0 / (alpha - 1.0)
    if _is(alpha, 2.0):
        mass = d.sum(-1, keepdim=True)
        slope = d.sign_().sum(-1, keepdim=True)  # the support size
    elif _is(alpha, 1.5):
        mass, slope = _row_dot(d, d, buffers), d.sum(-1, keepdim=True)
    else:
        d_pow = torch.pow(d, p - 1, out=buffers("pow", d.shape, d.dtype))
        if isinstance(p, torch.Tensor):  # a head at alpha = 2 has p - 1 = 0, and 0 ** 0 is 1
            d_pow.masked_fill_(torch.eq(d, 0, out=buffers("zero", d.shape, torch.bool)), 0.0)
        mass, slope = _row_dot(d_pow, d, buffers), d_pow.sum(-1, keepdim=True)  # sum d^p, sum d^(p-1)
    return ((mass - mass.pow(1.0 - 1.0 / p)) / slope).masked_fill_(empty, 0.0)


def _row_dot(a, b, buffers):
    """`sum_j a_j b_j` per row, `(..., 1)`: the product into a reused buffer, then summed
    (`linalg.vecdot` makes a fresh one)."""
    return torch.mul(a, b, out=buffers("product", a.shape, a.dtype)).sum(-1, keepdim=True)


class _Buffers:
    """Named buffers reused from step to step and block to block: `buffers(name, shape, dtype)`
    is a view of the first elements of one flat tensor per name, grown when too small. A fresh
    block-sized tensor can cost more in page faults than the arithmetic on it: glibc may hand a
    freed 4 MiB block back to the OS, and filling a fresh one took 7 ms against 0.1 ms for a
    reused one (this machine)."""

    def __init__(self, device):
        self.device, self.store = device, {}

    def __call__(self, name, shape, dtype):
        numel = math.prod(shape)
        buf = self.store.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self.store[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(shape)


def _alpha_grad_rows(p, dp, delta, alpha, buffers):
    """Each row's share of alpha's gradient, `reference.entmax_alpha_grad` with its temporaries
    in the buffers: `(sum dp p - delta) / (alpha - 1)^2 - (sum dp p ln p - delta H) /
    (alpha - 1)`, `H = sum p ln p` (0 ln 0 = 0)."""
    # log(0) takes libm's slow path (12x): clamped to the smallest normal, 0 ln 0 comes out 0
    p_log_p = torch.clamp(p, min=torch.finfo(p.dtype).tiny, out=buffers("p_log_p", p.shape, p.dtype))
    p_log_p.log_().mul_(p)
    entropy = p_log_p.sum(-1, keepdim=True)
    mean, mean_log = _row_dot(p, dp, buffers), _row_dot(p_log_p, dp, buffers)
    return (mean - delta) / (alpha - 1) ** 2 - (mean_log - delta * entropy) / (alpha - 1)


def _add_scaled(x, y, unit):
    """`x += unit * y` in place, for a float `unit` or a tensor that broadcasts against x."""
    if isinstance(unit, torch.Tensor):
        return x.add_(y * unit)
    return x.add_(y, alpha=unit)


class _Blocks:
    """The blocks of one call, and how to compute each block's weights.

    A block is one batch entry, a few key heads with their `G = Hq // Hkv` query heads each,
    and a run of query rows: its logits are `(heads, G, rows, keys)`, one matmul without
    repeating K, sized to stay in cache. Logits are kept in entmax units, `x = (alpha - 1) z`
    (`unit = alpha - 1`; 1 for softmax, `alpha = 1`): the per-row multiplier of `q.k`,
    `c_i = unit * scale * (s_h ln(n_i) if length-scaled)`, is folded into the query once. With
    softcapping the cap comes between: `c_i` leaves `unit` out, and `x = unit * cap * tanh(y /
    cap)` of `y = c_i q.k`. A float mask and ALiBi's bias are added to `z` after it. A sink is one
    more column of logits, `unit * sink_h` in every row, that takes weight and has no value.
    `alpha` is a float, or an `(Hq,)` tensor of them (`alpha_of` gives a block's, `(heads, G,
    1, 1)`), which the unit and every power follow.
    """

    def __init__(self, q, s, attn_mask, alibi, causal_offset, window_offset, scale, alpha, h_kv, n_k,
                 dropout_p, seed, softcap=None, alibi_offset=None, sink=None):
        b, h_q, n_q, _ = q.shape
        self.group, self.n_k = h_q // h_kv, n_k
        self.causal_offset, self.window_offset, self.alpha = causal_offset, window_offset, alpha
        self.head_alpha = isinstance(alpha, torch.Tensor)
        if self.head_alpha:
            self.unit = (alpha - 1).view(1, h_q, 1, 1)
        else:
            self.unit = 1.0 if alpha == SOFTMAX_ALPHA else alpha - 1
        self.softcap, self.alibi, self.alibi_offset = softcap, alibi, alibi_offset
        self.sink = None if sink is None else sink.to(q.dtype).view(1, -1, 1, 1)
        self.dropout_p, self.seed = dropout_p, seed
        self.mask4 = _mask_4d(attn_mask)
        pre = self.unit if softcap is None else 1.0  # the part of `unit` applied before the cap
        self.c = torch.full((1, 1, 1, 1), scale, dtype=q.dtype, device=q.device) * pre
        self.dc_ds = None  # d c / d s_h, for the gradient of s
        if s is not None:
            counts = allowed_counts(attn_mask, causal_offset, n_q, n_k, q.device, window_offset)
            self.dc_ds = pre * scale * torch.log(counts.clamp(min=1)).to(q.dtype).unsqueeze(-1)
            self.c = self.c * length_factor(s, counts, h_q)
        rows = min(n_q, _rows_per_block(BLOCK_ELEMENTS // self.group, n_k, causal_offset, window_offset))
        width = n_k  # the keys a block of rows sees, at most
        if causal_offset is not None and window_offset is not None:
            width = max(1, min(n_k, rows + causal_offset - window_offset))
        heads = min(h_kv, max(1, BLOCK_ELEMENTS // max(1, self.group * rows * max(width, 1))))
        self.bounds = [
            (i, h0, min(h_kv, h0 + heads), r0, min(n_q, r0 + rows))
            for i in range(b) for h0 in range(0, h_kv, heads) for r0 in range(0, n_q, rows)
        ]

    def alpha_of(self, h0, h1):
        """The alpha of block heads `h0:h1`: the float, or `(heads, G, 1, 1)` of the tensor."""
        if not self.head_alpha:
            return self.alpha
        return self.alpha[h0 * self.group:h1 * self.group].view(h1 - h0, self.group, 1, 1)

    def unit_of(self, h0, h1):
        return self.alpha_of(h0, h1) - 1 if self.head_alpha else self.unit

    def keys(self, r0, r1):
        """`(k0, k1)`: the block's rows see keys `k0:k1` only (the causal rule and the window)."""
        return _key_range(self.causal_offset, self.window_offset, r0, r1, self.n_k)

    def cut(self, t, i, h0, h1, r0, r1):
        """Block `(i, h0:h1, r0:r1)` of a tensor shaped like `(B, Hq, Nq, ...)`, where any of
        the three may be 1 (broadcast), as `(heads, G, rows, ...)`; broadcast dims stay 1."""
        t = t[i] if t.shape[0] > 1 else t[0]
        if t.shape[0] > 1:
            t = t[h0 * self.group : h1 * self.group].unflatten(0, (h1 - h0, self.group))
        else:
            t = t.unsqueeze(0)
        return t[:, :, r0:r1] if t.shape[2] > 1 else t

    def logits(self, qx, k, i, h0, h1, r0, r1, cap_slope=False, buffers=None):
        """`(x, no_key, slope)`: the `(heads, G, rows, keys)` logits `x` of a block, masked keys
        at -inf; which rows the masks leave no key (broadcastable bool, or None for none); and
        with `cap_slope` and a softcap, `dx/dy` of the cap, `unit * (1 - tanh^2)` (else None).

        `qx` is the query times `c`, grouped `(B, Hkv, G, Nq, D)`; `buffers` (a `_Buffers`), where
        to put them."""
        k0, k1 = self.keys(r0, r1)
        unit = self.unit_of(h0, h1)
        q_blk = qx[i, h0:h1, :, r0:r1].flatten(1, 2)  # (heads, G*rows, D)
        out = None if buffers is None else buffers("logits", (h1 - h0, q_blk.shape[1], k1 - k0), qx.dtype)
        x = torch.matmul(q_blk, k[i, h0:h1, k0:k1].transpose(-1, -2), out=out)
        x = x.unflatten(1, (self.group, r1 - r0))
        slope = None
        if self.softcap is not None:  # y -> unit * cap * tanh(y / cap), in place
            t = x.div_(self.softcap).tanh_()
            if cap_slope:
                slope = (1 - t * t).mul_(unit)
            x = t.mul_(unit * self.softcap)
        if self.alibi is not None:  # flash-attn's -slope_h |j - i - offset|, added to z
            slopes = self.cut(self.alibi[:, :, None, None], i, h0, h1, r0, r1)  # (heads or 1, G or 1, 1, 1)
            _add_scaled(x, alibi_bias(slopes.flatten(0, 1), self.alibi_offset, r0, r1, k0, k1, x.dtype).view(
                slopes.shape[0], slopes.shape[1], r1 - r0, k1 - k0), unit)
        mask = None if self.mask4 is None else self.cut(_keys_of(self.mask4, k0, k1), i, h0, h1, r0, r1)
        if mask is not None and mask.dtype != torch.bool:  # a float mask is added to z
            allows = float_mask_allows(mask)
            _add_scaled(x, mask.to(x.dtype).masked_fill(~allows, 0.0), unit)
            mask = allows
        band = _band_block(self.causal_offset, self.window_offset, r0, r1, k0, k1, x.device)
        if band is not None:
            mask = band if mask is None else mask & band
        no_key = None
        if mask is not None:
            x.masked_fill_(~mask, float("-inf"))
            no_key = ~mask.any(-1, keepdim=True)
        if self.sink is not None:  # its column comes last; every row has it
            sink = self.cut(self.sink, i, h0, h1, r0, r1) * unit  # (heads, G, 1, 1)
            # a row with no key stays empty: a sink of -inf would leave it nothing to normalize
            x = torch.cat((x, sink.expand(*x.shape[:-1], 1)), dim=-1)
        return x, no_key, slope

    def threshold(self, x, empty, alpha, buffers):
        """`(tau, packed)`: each row's `tau` (rows whose max is 0) at the block's `alpha`:
        entmax's (`entmax_threshold`), or softmax's log-sum-exp, so that the weights are `[x -
        max - tau]_+ ** (1 / unit)` or `exp(x - max - tau)` alike; and the candidates the
        search packed, if it did (`_Candidates.weights` then gives the weights)."""
        if _is(alpha, SOFTMAX_ALPHA):
            return torch.logsumexp(x, dim=-1, keepdim=True), None
        work = buffers("work", x.shape, x.dtype)
        tau, _, packed = entmax_threshold(x, alpha, empty, work, pack=True, buffers=buffers)
        return tau, packed

    def probs(self, x, row_max, tau, alpha, keep_base=False, buffers=None):
        """`(p, d)`: `d = [x - max - tau]_+`, computed in place in x, and the weights
        `p = d ** (1 / (alpha - 1))` at the block's `alpha`, normalised; p overwrites d unless
        `keep_base` (for sparsemax p is d itself; otherwise p goes to `buffers`, if given)."""
        # max first: `row_max + tau` would round tau away when the logits are large
        if _is(alpha, SOFTMAX_ALPHA):
            p = x.sub_(row_max).sub_(tau).exp_()
            return p.div_(p.sum(-1, keepdim=True).clamp_(min=torch.finfo(p.dtype).tiny)), p
        d = x.sub_(row_max).sub_(tau).clamp_(min=0)
        if _is(alpha, 2.0):
            p = d
        elif not keep_base:
            p = d.square_() if _is(alpha, 1.5) else d.pow_(1.0 / (alpha - 1))
        else:
            out = None if buffers is None else buffers("probs", d.shape, d.dtype)
            p = torch.square(d, out=out) if _is(alpha, 1.5) else torch.pow(d, 1.0 / (alpha - 1), out=out)
        # rounding leaves the sum a few ulps off 1; empty rows stay 0
        return p.div_(p.sum(-1, keepdim=True).clamp_(min=torch.finfo(p.dtype).tiny)), d

    def dropout_keep(self, p, index):
        """The block's dropout mask, scaled by 1/(1 - p_drop); the same in forward and backward."""
        gen = torch.Generator(device=p.device).manual_seed(self.seed + index)
        keep = torch.empty_like(p).bernoulli_(1 - self.dropout_p, generator=gen)
        return keep.div_(1 - self.dropout_p)


def _sparse_forward(q, k, v, s, alphas, attn_mask, sink, alibi, causal_offset, window_offset, scale, alpha,
                    dropout_p, softcap=None, alibi_offset=None):
    """Blockwise sparsemax / alpha-entmax: `(out, row_max, tau, seed)`, the row statistics
    `(B, Hkv, G, Nq, 1)` in the compute dtype (entmax units), the dropout seed a 0-d int64.
    `alphas`: None (the float `alpha` for every head) or `(Hq,)`, one per head."""
    dtype = _compute_dtype(q)
    alpha = alpha if alphas is None else alphas.to(dtype)
    b, h_kv, n_k, _ = k.shape
    seed = int(torch.randint(1 << 62, ())) if dropout_p > 0 else 0
    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    blocks = _Blocks(qc, s, attn_mask, alibi, causal_offset, window_offset, scale, alpha, h_kv, n_k,
                     dropout_p, seed, softcap, alibi_offset, sink)
    qx = (qc * blocks.c).unflatten(1, (h_kv, blocks.group))  # (B, Hkv, G, Nq, D)
    out = torch.empty(*qx.shape[:-1], v.shape[-1], dtype=dtype, device=q.device)
    row_max = torch.empty(*qx.shape[:-1], 1, dtype=dtype, device=q.device)
    tau = torch.empty_like(row_max)
    buffers = _Buffers(q.device)
    for index, (i, h0, h1, r0, r1) in enumerate(blocks.bounds):
        k0, k1 = blocks.keys(r0, r1)
        if k0 == k1:  # rows outside every key's band (above the first, say): no weight anywhere
            out[i, h0:h1, :, r0:r1] = 0
            row_max[i, h0:h1, :, r0:r1], tau[i, h0:h1, :, r0:r1] = 0, float("inf")
            continue
        x, no_key, _ = blocks.logits(qx, kc, i, h0, h1, r0, r1, buffers=buffers)
        m = x.amax(-1, keepdim=True)
        empty = m == float("-inf")
        # a row whose allowed keys all have logit -inf (an inf in q or k) is NaN, as in the
        # definition; only a row the masks leave without keys is empty
        m.masked_fill_(empty if no_key is None else empty & ~no_key, float("nan"))
        empty = torch.zeros_like(empty) if no_key is None else empty & no_key
        m.masked_fill_(empty, 0.0)
        block_alpha = blocks.alpha_of(h0, h1)
        x_m = torch.sub(x, m, out=buffers("centred", x.shape, x.dtype))
        t, packed = blocks.threshold(x_m, empty, block_alpha, buffers)
        t.masked_fill_(empty, float("inf"))  # no key: every weight is 0
        row_max[i, h0:h1, :, r0:r1], tau[i, h0:h1, :, r0:r1] = m, t
        sparse = packed is not None and dropout_p == 0 and sink is None and not bool(torch.isnan(t).any())
        if sparse:  # the packed keys' weights times their values: no pow, nor product, on the others
            out_blk = packed.attend(t, block_alpha, vc[i, h0:h1, k0:k1])
        else:
            if packed is not None:
                p = packed.weights(t, block_alpha, out=x_m)
            else:
                p, _ = blocks.probs(x, m, t, block_alpha)
            if dropout_p > 0:
                p.mul_(blocks.dropout_keep(p, index))
            out_blk = torch.matmul(p[..., :k1 - k0].flatten(1, 2), vc[i, h0:h1, k0:k1])  # the sink: no value
        out[i, h0:h1, :, r0:r1] = out_blk.unflatten(1, (blocks.group, r1 - r0))
    return out.flatten(1, 2).to(q.dtype), row_max, tau, torch.tensor(seed, device=q.device)


def _sparse_backward(do, q, k, v, s, alphas, attn_mask, sink, alibi, row_max, tau, seed, causal_offset,
                     window_offset, scale, alpha, dropout_p, softcap, alibi_offset, mask_grad):
    """Gradients of `_sparse_forward`, each block's weights recomputed from the saved `row_max`
    and `tau`: `(dq, dk, dv, ds, dalpha, dmask, dsink)`; `ds`, `dalpha`, `dmask` and `dsink` are
    empty when there is no length scale, tensor alpha, mask gradient or sink to give (an op
    returns tensors, not None)."""
    dtype, h_kv = row_max.dtype, k.shape[1]
    alpha = alpha if alphas is None else alphas.to(dtype)
    blocks = _Blocks(q.to(dtype), s, attn_mask, alibi, causal_offset, window_offset, scale, alpha, h_kv,
                     k.shape[2], dropout_p, int(seed), softcap, alibi_offset, sink)
    g = blocks.group
    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    qx = (qc * blocks.c).unflatten(1, (h_kv, g))
    # A row the forward found a NaN in (saved row max NaN) gets a NaN upstream gradient, so that
    # the products carry it wherever the row reaches, as the definition's would: `u` alone
    # would drop it (torch.sign(nan) is 0).
    do = do.to(dtype).unflatten(1, (h_kv, g)) + row_max * 0  # (B, Hkv, G, Nq, Dv)
    dqx = torch.empty_like(qx)
    dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)
    # z = ... + mask, x = (alpha - 1) z: a float mask's gradient is (alpha - 1) dx, summed over
    # the dims it broadcasts along
    dmask4 = torch.zeros(blocks.mask4.shape, dtype=dtype, device=q.device) if mask_grad else None
    dsink = None if sink is None else torch.zeros(q.shape[0], q.shape[1], dtype=dtype, device=q.device)
    buffers = _Buffers(q.device)
    dalpha = None if alphas is None else torch.zeros(h_kv, g, dtype=dtype, device=q.device)
    for index, (i, h0, h1, r0, r1) in enumerate(blocks.bounds):
        k0, k1 = blocks.keys(r0, r1)
        if k0 == k1:
            dqx[i, h0:h1, :, r0:r1] = 0
            continue
        block_alpha, unit = blocks.alpha_of(h0, h1), blocks.unit_of(h0, h1)
        x, _, cap_slope = blocks.logits(qx, kc, i, h0, h1, r0, r1, cap_slope=True, buffers=buffers)
        p, d = blocks.probs(x, row_max[i, h0:h1, :, r0:r1], tau[i, h0:h1, :, r0:r1], block_alpha,
                            keep_base=True, buffers=buffers)
        do_blk = do[i, h0:h1, :, r0:r1].flatten(1, 2)  # (heads, G*rows, Dv)
        dp = torch.matmul(do_blk, vc[i, h0:h1, k0:k1].transpose(-1, -2),
                          out=buffers("dp", (h1 - h0, do_blk.shape[1], k1 - k0), dtype))
        dp = dp.unflatten(1, (g, r1 - r0))
        if sink is not None:  # the sink's column: no value, so dP = 0 there
            dp = torch.cat((dp, dp.new_zeros(*dp.shape[:-1], 1)), dim=-1)
        p_used = p
        if blocks.dropout_p > 0:
            keep = blocks.dropout_keep(p, index)
            p_used = p * keep
            dp.mul_(keep)
        dv[i, h0:h1, k0:k1] += torch.matmul(p_used[..., :k1 - k0].flatten(1, 2).transpose(-1, -2), do_blk)
        # dp/dx = u / (alpha - 1), u = p ** (2 - alpha) on the support: the indicator for
        # sparsemax, d for alpha = 1.5, and p / d in general (a division, not a second pow);
        # softmax's is p itself
        if _is(alpha, SOFTMAX_ALPHA):
            u = p
        elif _is(alpha, 2.0):
            u = d.sign_()
        elif _is(alpha, 1.5):
            u = d
        else:
            u = torch.div(p, d, out=buffers("slopes", d.shape, d.dtype)).nan_to_num_(nan=0.0)  # 0/0: 0
        delta = _row_dot(u, dp, buffers) / u.sum(-1, keepdim=True).clamp_(min=1e-30)
        if dalpha is not None:  # before dp turns into dx below
            dalpha[h0:h1] += _alpha_grad_rows(p, dp, delta, block_alpha, buffers).sum((-1, -2))
        dx = dp.sub_(delta).mul_(u).div_(unit)  # (heads, G, rows, keys)
        if sink is not None:  # z_sink = sink_h, x = unit z
            dsink[i, h0 * g:h1 * g] += (dx[..., -1:] * unit).sum((-1, -2)).flatten()
            dx = dx[..., :-1]
        if dmask4 is not None:
            target = blocks.cut(_keys_of(dmask4, k0, k1), i, h0, h1, r0, r1)  # a view into dmask4
            target.add_((dx * unit).sum_to_size(target.shape))
        if cap_slope is not None:  # through the cap: the gradient of y = c q.k
            dx.mul_(cap_slope)
        dx = dx.flatten(1, 2)  # (heads, G*rows, keys)
        dqx[i, h0:h1, :, r0:r1] = torch.matmul(dx, kc[i, h0:h1, k0:k1]).unflatten(1, (g, r1 - r0))
        dk[i, h0:h1, k0:k1] += torch.matmul(dx.transpose(-1, -2), qx[i, h0:h1, :, r0:r1].flatten(1, 2))
    dq = dqx.flatten(1, 2) * blocks.c  # x = (q c) . k
    ds = q.new_empty(0, dtype=dtype)
    if s is not None:
        # x_ij = c_i q_i.k_j: ds_h = sum_i dc_i/ds_h * q_i . (sum_j dx_ij k_j)
        per_row = torch.linalg.vecdot(qc, dqx.flatten(1, 2)).unsqueeze(-1) * blocks.dc_ds
        ds = per_row.sum(dim=(0, 2, 3)).to(s.dtype)
    dmask = q.new_empty(0) if dmask4 is None else dmask4.reshape(attn_mask.shape).to(attn_mask.dtype)
    dsink = q.new_empty(0, dtype=dtype) if dsink is None else dsink.sum(0).to(sink.dtype)
    dalpha = q.new_empty(0, dtype=dtype) if dalpha is None else dalpha.flatten().to(alphas.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds, dalpha, dmask, dsink


# The two halves as custom ops: opaque to torch.compile (the threshold search's early exit reads
# data), given shapes by their fake implementations (which also serve the meta device), and by
# `vmap` one call per slice (`vmap_by_loop`).


@torch.library.custom_op("longattn::blockwise_entmax_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None,
            alphas: torch.Tensor | None, attn_mask: torch.Tensor | None, sink: torch.Tensor | None,
            alibi: torch.Tensor | None, causal_offset: int | None, window_offset: int | None, scale: float,
            alpha: float, dropout_p: float, softcap: float | None,
            alibi_offset: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sparse_forward(q, k, v, s, alphas, attn_mask, sink, alibi, causal_offset, window_offset, scale,
                           alpha, dropout_p, softcap, alibi_offset)


@_fwd_op.register_fake
def _(q, k, v, *args):
    b, h_kv, _, _ = k.shape
    stats = (b, h_kv, q.shape[1] // h_kv, q.shape[2], 1)
    dtype = _compute_dtype(q)
    return (q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(stats, dtype=dtype),
            q.new_empty(stats, dtype=dtype), q.new_empty((), dtype=torch.int64))


@torch.library.custom_op("longattn::blockwise_entmax_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None,
            alphas: torch.Tensor | None, attn_mask: torch.Tensor | None, sink: torch.Tensor | None,
            alibi: torch.Tensor | None, row_max: torch.Tensor,
            tau: torch.Tensor, seed: torch.Tensor, causal_offset: int | None, window_offset: int | None,
            scale: float, alpha: float, dropout_p: float, softcap: float | None, alibi_offset: int | None,
            mask_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor]:
    return _sparse_backward(do, q, k, v, s, alphas, attn_mask, sink, alibi, row_max, tau, seed, causal_offset,
                            window_offset, scale, alpha, dropout_p, softcap, alibi_offset, mask_grad)


@_bwd_op.register_fake
def _(do, q, k, v, s, alphas, attn_mask, sink, alibi, row_max, *args):
    mask_grad = args[-1]
    ds = q.new_empty(0, dtype=row_max.dtype) if s is None else s.new_empty(s.shape)
    dalpha = q.new_empty(0, dtype=row_max.dtype) if alphas is None else alphas.new_empty(alphas.shape)
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else q.new_empty(0)
    dsink = q.new_empty(0, dtype=row_max.dtype) if sink is None else sink.new_empty(sink.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds, dalpha, dmask, dsink


_fwd_op.register_vmap(vmap_by_loop(_fwd_op))
_bwd_op.register_vmap(vmap_by_loop(_bwd_op))


class SparseAttention(torch.autograd.Function):
    """Blockwise sparsemax / alpha-entmax attention (softmax at `alpha = SOFTMAX_ALPHA`) with a
    saved per-row threshold, in the form torch.func takes (`setup_context`; vmap through the ops'
    rules). Shapes as `reference.attention`; `s` and `alphas` are None or `(Hq,)` in the compute
    dtype (with `alphas`, the float `alpha` is not read), `alibi`
    None or the call's `(1 or B, Hq)` slopes (no gradient). Returns `(out, row_max, tau, seed)`,
    of which only `out` is differentiable. The backward is not itself differentiable: a second
    derivative raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, s, alphas, attn_mask, sink, alibi, causal_offset, window_offset, scale, alpha,
                dropout_p, softcap, alibi_offset):
        return torch.ops.longattn.blockwise_entmax_fwd(q, k, v, s, alphas, attn_mask, sink, alibi,
                                                       causal_offset, window_offset, scale, alpha, dropout_p,
                                                       softcap, alibi_offset)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, s, alphas, attn_mask, sink, alibi, *settings = inputs
        _, row_max, tau, seed = output
        ctx.mark_non_differentiable(row_max, tau, seed)
        ctx.save_for_backward(q, k, v, s, alphas, attn_mask, sink, alibi, row_max, tau, seed)
        ctx.args = tuple(settings)

    @staticmethod
    def backward(ctx, grad_out, *_):
        q, k, v, s, alphas, attn_mask, sink, alibi, row_max, tau, seed = ctx.saved_tensors
        mask_grad = attn_mask is not None and ctx.needs_input_grad[5]
        with torch.no_grad():
            grads = torch.ops.longattn.blockwise_entmax_bwd(
                grad_out, q, k, v, s, alphas, attn_mask, sink, alibi, row_max, tau, seed, *ctx.args, mask_grad
            )
        dq, dk, dv, ds, dalpha, dmask, dsink = first_order_only(
            "longattn::blockwise_entmax_bwd", grads, (grad_out, q, k, v, s, alphas, attn_mask, sink))
        ds = ds if s is not None else None
        dalpha = dalpha if alphas is not None else None
        dsink = dsink if sink is not None else None
        return (dq, dk, dv, ds, dalpha, dmask if mask_grad else None, dsink, None,
                *(None,) * len(ctx.args))
