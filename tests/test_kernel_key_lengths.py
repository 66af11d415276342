"""The Triton kernels' key lengths (`seqused_k`, flash-attn's: batch b attends to its first
`clamp(seqused_k[b], 0, Nk)` keys) against the float64 reference given the same keys as a
mask: the output and every gradient (q, k, v, a tensor length scale) for each normalizer, with
causal offsets, GQA, odd lengths, an empty, a full, a partial and an over-long key length, and
every buffer poisoned with NaN; that the tiles past a key length are skipped, not just masked;
and the custom ops under opcheck and torch.compile.
"""

import pytest
import torch
from test_triton_softmax import plain_attention
from triton.runtime.interpreter import InterpreterBuilder

import longattn
from longattn.kernels.entmax import entmax_attention, entmax_attention_bwd, entmax_attention_fwd
from longattn.kernels.softmax import softmax_attention, softmax_attention_bwd, softmax_attention_fwd

from conftest import INTERPRET, KERNEL_DEVICE
from helpers import allowed_keys, check_kernel_call, kernel_leaves

DEVICE = KERNEL_DEVICE
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

HQ, HKV = 4, 2
# (normalizer, alpha, causal offset): each of the four masks (none, causal, a negative and a
# positive offset) once in each kernel family, every normalizer at least once
CASES = [("softmax", 1.5, None), ("softmax", 1.5, -5), ("ssmax", 1.5, 0), ("ssmax", 1.5, 7),
         ("sparsemax", 2.0, None), ("entmax", 1.5, 0), ("entmax", 1.5, -5), ("entmax", 1.25, 7)]


def case_name(normalizer, alpha, causal_offset):
    mask = {None: "full", 0: "causal"}.get(causal_offset, f"offset{causal_offset}")
    return f"{normalizer}{alpha if normalizer == 'entmax' else ''}-{mask}"


def key_mask(seqused_k: torch.Tensor, Nk: int) -> torch.Tensor:
    """The key lengths as the reference's `(B, 1, 1, Nk)` bool mask."""
    B = seqused_k.numel()
    return (torch.arange(Nk) < seqused_k.cpu().clamp(0, Nk)[:, None]).view(B, 1, 1, Nk)


def kernel_attention(q, k, v, normalizer, alpha, causal_offset, length_scale, seqused_k):
    if normalizer in ("softmax", "ssmax"):
        return softmax_attention(q, k, v, causal_offset=causal_offset, length_scale=length_scale,
                                 seqused_k=seqused_k)
    alpha = 2.0 if normalizer == "sparsemax" else alpha
    return entmax_attention(q, k, v, alpha=alpha, causal_offset=causal_offset, length_scale=length_scale,
                            seqused_k=seqused_k)


def check_against_reference(B, Nq, Nk, D, Dv, seqused_k, normalizer, alpha, causal_offset, dtype):
    """Output and gradients of q, k, v and the length scale (a `(Hq,)` tensor for SSMax and
    entmax; none for softmax and sparsemax) under the kernels' tolerance rule, against the
    reference backend given the key lengths as a mask; dK, dV of the unused keys exactly 0.
    The baseline has every input in `dtype`, the length scale too: in fp16 the kernels' ds errs
    ~1e-3, as the baseline's then does, but ~1e-7 from an fp32 length scale."""
    scaled = normalizer in ("ssmax", "entmax")
    q, k, v, s = kernel_leaves(B, HQ, HKV, Nq, Nk, D, Dv, DEVICE, dtype, scaled)
    inputs = [q, k, v] + ([s] if scaled else [])
    seqused_k = torch.tensor(seqused_k, dtype=torch.int32, device=DEVICE)
    out = kernel_attention(q, k, v, normalizer, alpha, causal_offset, s, seqused_k)

    def reference(args):
        q_, k_, v_, *s_ = args
        return longattn.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=key_mask(seqused_k, Nk), causal_offset=causal_offset, normalizer=normalizer,
            alpha=alpha, length_scale=s_[0] if s_ else None, enable_gqa=True, backend="reference")

    def plain(args):
        # the reference backend's fp16 softmax errs less than any fp16 kernel: the softmax
        # kernel tests' baseline is the definition materialised in fp16
        allowed = key_mask(seqused_k, Nk) & allowed_keys(Nq, Nk, causal_offset)
        return plain_attention(*args[:3], args[3] if scaled else None, allowed, D ** -0.5)[0]

    sixteen_bit_softmax = dtype != torch.float32 and normalizer in ("softmax", "ssmax")
    got = check_kernel_call(out, inputs, reference, dtype, ["dq", "dk", "dv", "ds"][:len(inputs)],
                            plain if sixteen_bit_softmax else None)
    unused = ~key_mask(seqused_k, Nk)[:, :, 0, :, None].expand(B, HKV, Nk, 1)
    for name, g in (("dk", got[1]), ("dv", got[2])):
        assert (g.cpu()[unused.expand_as(g)] == 0).all(), f"{name} of unused keys"


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha,causal_offset", CASES, ids=[case_name(*c) for c in CASES])
def test_matches_the_reference_masked_to_the_key_lengths(normalizer, alpha, causal_offset):
    """Odd lengths, GQA, Dv != D; the batches' key lengths empty, partial, full and past Nk."""
    check_against_reference(4, 37, 45, 16, 24, [0, 20, 45, 60], normalizer, alpha, causal_offset,
                            torch.float32)


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("normalizer,alpha", [("ssmax", 1.5), ("entmax", 1.5)], ids=["ssmax", "entmax1.5"])
def test_key_lengths_across_key_tiles(normalizer, alpha, dtype):
    """Nk = 130, over two 64-key blocks (16-bit) or four 32-key tiles (fp32): the key lengths end
    inside a later tile and inside the first, and a negative one counts as 0."""
    check_against_reference(3, 33, 130, 24, 24, [100, 13, -4], normalizer, alpha, 3, dtype)


def count_key_tile_loads(run, k, monkeypatch) -> int:
    """How many tile loads of `run()` read from `k`'s storage, masked or not: a tile skipped
    costs none, a tile merely masked out one each."""
    lo = k.untyped_storage().data_ptr()
    hi = lo + k.untyped_storage().nbytes()
    count = 0
    masked_load = InterpreterBuilder.create_masked_load

    def counting(self, ptrs, mask, other, *args):
        nonlocal count
        count += int(((ptrs.data >= lo) & (ptrs.data < hi)).any())
        return masked_load(self, ptrs, mask, other, *args)

    with monkeypatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_masked_load", counting)
        run()
    return count


@pytest.mark.skipif(not INTERPRET, reason="counts the Triton interpreter's loads")
@pytest.mark.parametrize("family", ["softmax", "entmax"])
def test_tiles_past_the_key_length_are_skipped(family, monkeypatch):
    """Forward and backward over 130 keys of which 40 are used load K exactly as often as over
    the 40 keys alone: the key loops stop at the key length, and the dK/dV programs past it
    return before loading (the grids still span the 130 keys)."""
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 130, 16), torch.randn(1, 1, 130, 16)

    def forward_backward(k, v, seqused_k):
        if family == "softmax":
            out, lse = softmax_attention_fwd(q, k, v, 0.25, 2, 0.7, seqused_k=seqused_k)
            softmax_attention_bwd(out, q, k, v, out, lse, 0.25, 2, 0.7, seqused_k=seqused_k)
        else:
            out, row_max, tau, flags = entmax_attention_fwd(q, k, v, 0.25, 1.5, 2, 0.7, seqused_k=seqused_k)
            entmax_attention_bwd(out, q, k, v, row_max, tau, flags, 0.25, 1.5, 2, 0.7, seqused_k=seqused_k)

    used = torch.tensor([40], dtype=torch.int32)
    with_lengths = count_key_tile_loads(lambda: forward_backward(k, v, used), k, monkeypatch)
    truncated = count_key_tile_loads(lambda: forward_backward(k[:, :, :40], v[:, :, :40], None), k,
                                     monkeypatch)
    full = count_key_tile_loads(lambda: forward_backward(k, v, None), k, monkeypatch)
    assert with_lengths == truncated < full


def test_key_lengths_are_for_dense_inputs_only():
    q = torch.randn(9, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    used = torch.tensor([3, 3], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dense"):
        softmax_attention_fwd(q, q, q, 0.25, None, None, cu, cu, 5, 5, seqused_k=used)
    with pytest.raises(ValueError, match="dense"):
        entmax_attention_fwd(q, q, q, 0.25, 1.5, None, None, cu, cu, 5, 5, seqused_k=used)
    with pytest.raises(ValueError, match="int32"):
        softmax_attention_fwd(q[None], q[None], q[None], 0.25, None, seqused_k=used.long()[:1])


def opcheck_kernel_ops(q, k, v, s, kwargs):
    """torch.library.opcheck (schema, fake implementations) of the four kernel ops, causal offset
    3 and length scale `s`, with the keyword arguments `kwargs`."""
    out, lse = softmax_attention_fwd(q, k, v, 0.25, 3, s, **kwargs)
    _, row_max, tau, flags = entmax_attention_fwd(q, k, v, 0.25, 1.5, 3, s, **kwargs)
    for op, args in [
        (torch.ops.longattn.softmax_attention_fwd, (q, k, v, 0.25, 3, s)),
        (torch.ops.longattn.softmax_attention_bwd, (torch.randn_like(out), q, k, v, out, lse, 0.25, 3, s,
                                                    None)),
        (torch.ops.longattn.entmax_attention_fwd, (q, k, v, 0.25, 1.5, 3, s)),
        (torch.ops.longattn.entmax_attention_bwd,
         (torch.randn_like(out), q, k, v, row_max, tau, flags, 0.25, 1.5, 3, s)),
    ]:
        torch.library.opcheck(op, args, kwargs, test_utils=("test_schema", "test_faketensor"))


def test_custom_ops_opcheck_and_compile_with_key_lengths():
    """The ops' schemas take `seqused_k` (opcheck: schema, fake implementations), and
    torch.compile(fullgraph=True) traces both entries with it, forward and backward (the AOT
    dispatch that opcheck would test too, at a few seconds an op)."""
    q, k, v = (torch.randn(2, n, 13, 16, device=DEVICE) for n in (4, 2, 2))
    s = (0.5 + torch.rand(4)).to(DEVICE)
    used = torch.tensor([5, 40], dtype=torch.int32, device=DEVICE)
    kwargs = {"seqused_k": used}
    opcheck_kernel_ops(q, k, v, s, kwargs)

    leaves_ = [t.clone().requires_grad_() for t in (q, k, v, s)]

    def attend(q, k, v, s, seqused_k):
        return (softmax_attention(q, k, v, is_causal=True, length_scale=s, seqused_k=seqused_k)
                + entmax_attention(q, k, v, alpha=1.25, length_scale=s, seqused_k=seqused_k))

    # aot_eager: the fake implementations and the graph without graph breaks are what is tested
    # here; inductor's code generation around opaque ops is the existing compile tests' business
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    results = [fn(*leaves_, used) for fn in (compiled, attend)]
    torch.testing.assert_close(results[0], results[1])
    do = torch.randn_like(results[1])
    got, expected = (torch.autograd.grad(r, leaves_, do) for r in results)
    torch.testing.assert_close(got, expected)


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha,extra", [("ssmax", 1.5, "mask"), ("entmax", 1.5, "modifiers")])
def test_bounds_count_from_each_key_length(normalizer, alpha, extra):
    """`causal_from_end` with key lengths: batch b's causal offset, window and ALiBi diagonal
    count from its corner `(Nq, seqused_k[b])`, read on the device (flash-attn's `cache_seqlens`
    with `causal=True`). Each batch equals itself alone on its first keys under the float64
    reference: output and gradients (q, k, v, s, and the sink's). Lengths of 0, below Nq (rows
    with no key), inside a later key tile and past Nk; a window across tiles, with a bool mask
    (n_i from the mask pass, which counts from the same corner) or with ALiBi, a cap and a sink."""
    B, Nq, Nk, D = 4, 21, 70, 16
    lengths = [0, 9, 50, 90]
    q, k, v, s = kernel_leaves(B, HQ, HKV, Nq, Nk, D, D, DEVICE, torch.float32, True)
    inputs, mods = [q, k, v, s], {"window_size": (24, 2)}
    if extra == "mask":
        mods["attn_mask"] = (torch.rand(B, 1, Nq, Nk) > 0.3).to(DEVICE)
    else:
        inputs.append(torch.randn(HQ, device=DEVICE).requires_grad_())
        mods.update(alibi_slopes=torch.rand(B, HQ, device=DEVICE), softcap=4.0)
    seqused_k = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    kernel = softmax_attention if normalizer == "ssmax" else entmax_attention
    extra_args = {} if normalizer == "ssmax" else {"alpha": alpha}
    out = kernel(q, k, v, causal_offset=0, causal_from_end=True, length_scale=s, seqused_k=seqused_k,
                 sink=inputs[4] if len(inputs) > 4 else None, **mods, **extra_args)

    def reference(args):
        q_, k_, v_, s_, *sink = args
        outs = []
        for b, n in enumerate(min(n, Nk) for n in lengths):
            kw = {name: value.cpu() for name, value in mods.items() if torch.is_tensor(value)}
            kw = {"attn_mask": kw["attn_mask"][b:b + 1, ..., :n]} if "attn_mask" in kw else \
                {"alibi_slopes": kw["alibi_slopes"][b:b + 1].double(), "softcap": mods["softcap"]}
            outs.append(longattn.scaled_dot_product_attention(
                q_[b:b + 1], k_[b:b + 1, :, :n], v_[b:b + 1, :, :n], causal_offset="bottom_right",
                window_size=mods["window_size"], normalizer=normalizer, alpha=alpha, length_scale=s_,
                sink=sink[0] if sink else None, enable_gqa=True, backend="reference", **kw))
        return torch.cat(outs)

    check_kernel_call(out, inputs, reference, torch.float32, ["dq", "dk", "dv", "ds", "dsink"][:len(inputs)])
