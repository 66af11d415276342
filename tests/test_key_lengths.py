"""`seqused_k`, per-batch key lengths (flash-attn's): batch `b` attends to its first
`seqused_k[b]` keys, exactly as the key mask `arange(Nk) < seqused_k[b]` does, on every path and
for every normalizer, forward and every gradient; bad values are clamped, bad tensors refused."""

from __future__ import annotations

import pytest
import torch

import longattn

from conftest import NORMALIZER_CASES
from helpers import leaves
from oracles import rel_err

LENGTHS = [0, 5, 13, 40, -3]  # none, part, all (Nk = 13), past the end, below zero


def key_mask(lengths: torch.Tensor, n_k: int) -> torch.Tensor:
    return (torch.arange(n_k) < lengths.clamp(0, n_k)[:, None]).view(-1, 1, 1, n_k)


def inputs(dtype=torch.float64):
    q = torch.randn(len(LENGTHS), 4, 9, 8, dtype=dtype)
    k, v = torch.randn(len(LENGTHS), 2, 13, 8, dtype=dtype), torch.randn(len(LENGTHS), 2, 13, 6, dtype=dtype)
    s = 0.4 + torch.rand(4, dtype=dtype)
    bias = torch.randn(1, 4, 9, 13, dtype=dtype)
    return q, k, v, s, bias


@pytest.mark.parametrize("causal_offset", [None, 0, -2, 4])
@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_key_lengths_are_the_key_mask(backend, normalizer, alpha, causal_offset):
    """With a float mask beside them (its gradient too), GQA and a learned length scale."""
    lengths = torch.tensor(LENGTHS)
    args = inputs()
    q, k, v, s, bias = leaves(args)
    kwargs = dict(enable_gqa=True, normalizer=normalizer, alpha=alpha, causal_offset=causal_offset)
    out = longattn.scaled_dot_product_attention(q, k, v, attn_mask=bias, length_scale=s, seqused_k=lengths,
                                                backend=backend, **kwargs)
    q2, k2, v2, s2, bias2 = leaves(args)
    masked = torch.where(key_mask(lengths, 13), bias2, float("-inf"))
    ref = longattn.scaled_dot_product_attention(q2, k2, v2, attn_mask=masked, length_scale=s2,
                                                backend="reference", **kwargs)
    assert out.isfinite().all()
    assert rel_err(out, ref) < 1e-12
    assert out[0].abs().max() == 0  # batch 0 sees no key
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, s, bias), grad)
    want = torch.autograd.grad(ref, (q2, k2, v2, s2, bias2), grad)
    for name, g, w in zip(("q", "k", "v", "length_scale", "attn_mask"), got, want):
        assert rel_err(g, w) < 1e-10, name
    assert got[1][1, :, 5:].abs().max() == 0 and got[2][1, :, 5:].abs().max() == 0  # unseen keys


@pytest.mark.parametrize("normalizer", ["ssmax", "entmax"])
def test_triton_takes_key_lengths_itself(normalizer):
    """backend="triton" (the interpreter, float32) gets the lengths, not a mask: it would refuse
    a mask. `tests/test_kernel_key_lengths.py` holds the kernels to the reference in depth."""
    lengths = torch.tensor(LENGTHS)
    q, k, v, s, _ = (t.float() for t in inputs())
    kwargs = dict(enable_gqa=True, normalizer=normalizer, length_scale=s, causal_offset=2)
    got = longattn.scaled_dot_product_attention(q, k, v, seqused_k=lengths, backend="triton", **kwargs)
    want = longattn.scaled_dot_product_attention(q.double(), k.double(), v.double(), backend="reference",
                                                 attn_mask=key_mask(lengths, 13), **kwargs)
    assert rel_err(got, want) < 1e-5


def test_unbatched_and_int64():
    q, k, v, _, _ = inputs()
    lengths = torch.tensor([6])
    got = longattn.scaled_dot_product_attention(q[1], k[1], v[1], enable_gqa=True, seqused_k=lengths)
    want = longattn.scaled_dot_product_attention(q[1], k[1], v[1], enable_gqa=True,
                                                 attn_mask=key_mask(lengths, 13)[0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("causal_offset", [None, "bottom_right"])
def test_compiles_without_a_graph_break(causal_offset):
    """The lengths are folded into a mask by tensor ops: no host read, so one graph. Counted from
    each batch's end, the bounds and ALiBi join the mask too; eager runs the batches one by one."""
    q, k, v, s, _ = inputs(torch.float32)
    lengths = torch.tensor(LENGTHS)
    kwargs = dict(causal_offset=causal_offset, window_size=(2, 0), alibi_slopes=torch.rand(4))
    kwargs = kwargs if causal_offset else {}

    def attention(q, k, v, lengths):
        return longattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, normalizer="entmax",
                                                     length_scale=s, seqused_k=lengths, backend="torch",
                                                     **kwargs)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, lengths), attention(q, k, v, lengths), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("seqused_k", "error", "match"), [
    ([3, 4, 5, 6, 7], TypeError, "must be None or a torch.Tensor"),
    (torch.ones(5), TypeError, "int32 or int64"),
    (torch.ones(4, dtype=torch.int32), ValueError, r"shape \(5,\)"),
    (torch.ones(5, 1, dtype=torch.int32), ValueError, r"shape \(5,\)"),
    (torch.ones(5, dtype=torch.int32, device="meta"), ValueError, "must be on cpu"),
])
def test_bad_key_lengths(seqused_k, error, match):
    q, k, v, _, _ = inputs()
    with pytest.raises(error, match=match):
        longattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, seqused_k=seqused_k)


def per_batch(q, k, v, lengths, slopes, mask, **kwargs):
    """Each batch alone on its first keys, bottom-right aligned: what the per-batch corner means."""
    outs = []
    for b, n in enumerate(lengths.clamp(0, k.shape[-2]).tolist()):
        outs.append(longattn.scaled_dot_product_attention(
            q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], attn_mask=mask[..., :n],
            alibi_slopes=slopes[b:b + 1], causal_offset="bottom_right", backend="reference", **kwargs))
    return torch.cat(outs)


@pytest.mark.parametrize("normalizer,alpha", NORMALIZER_CASES)
def test_bottom_right_counts_from_each_batchs_key_length(backend, normalizer, alpha):
    """`causal_offset="bottom_right"` with key lengths aligns batch b at `seqused_k[b] - Nq`
    (flash-attn's `cache_seqlens`): each batch equals itself alone on its first keys, with a
    window, ALiBi (whose diagonal moves with the corner), a sink and a float mask beside it;
    the output and every gradient (q, k, v, length scale, mask, sink). The lengths 5 < Nq leave
    rows with no key. `torch` runs the batches one at a time, `reference` takes a mask."""
    lengths = torch.tensor(LENGTHS)
    q, k, v, s, bias = inputs()
    slopes, sink = torch.rand(len(LENGTHS), 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    kwargs = dict(enable_gqa=True, normalizer=normalizer, alpha=alpha, window_size=(3, 1), softcap=3.0)
    args = leaves((q, k, v, s, bias, sink))
    out = longattn.scaled_dot_product_attention(
        *args[:3], attn_mask=args[4], length_scale=args[3], sink=args[5], alibi_slopes=slopes,
        seqused_k=lengths, causal_offset="bottom_right", backend=backend, **kwargs)
    args2 = leaves((q, k, v, s, bias, sink))
    ref = per_batch(*args2[:3], lengths, slopes, args2[4], length_scale=args2[3], sink=args2[5], **kwargs)
    assert out.isfinite().all()
    assert rel_err(out, ref) < 1e-12
    assert out[0].abs().max() == 0 and out[1, :, :4].abs().max() == 0  # no key: batch 0, and 4 rows of 1
    grad = torch.randn_like(out)
    got, want = torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args2, grad)
    for name, g, w in zip(("q", "k", "v", "length_scale", "attn_mask", "sink"), got, want):
        assert rel_err(g, w) < 1e-10, name
