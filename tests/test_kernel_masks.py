"""`attn_mask` and block maps in the Triton kernels, against the float64 reference: the output and
every gradient (q, k, v, a length scale, a float mask's own, summed over the dims it broadcasts
along) for each normalizer, with boolean and float masks of every broadcast shape (a float16
mask beside float32 inputs, a float64 one, entries at -inf and at the dtype's lowest value),
fully masked rows, GQA, causal offsets, the logit modifiers and windows, every buffer poisoned
with NaN; block maps that clear tiles; the tiles skipped (K loads counted); the errors; the
ops' schemas and torch.compile."""

import pytest
import torch
from test_kernel_key_lengths import count_key_tile_loads, opcheck_kernel_ops

import longattn
from longattn import BlockMap
from longattn.kernels.entmax import entmax_attention, entmax_attention_bwd, entmax_attention_fwd
from longattn.kernels.softmax import softmax_attention, softmax_attention_bwd, softmax_attention_fwd

from conftest import INTERPRET, KERNEL_DEVICE
from helpers import check_kernel_call, kernel_leaves

DEVICE = KERNEL_DEVICE
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

B, HQ, HKV, NQ, NK = 2, 4, 2, 37, 70


def make_mask(kind, dtype=torch.float32, seed=0):
    """A mask of each broadcast shape: "padding" `(B, 1, 1, Nk)` bool (batch 1 keeps its first 23
    keys); "heads" `(1, Hq, Nq, Nk)` float with -inf and lowest-value entries; "plane" `(Nq, Nk)`
    float in `dtype`; "full" `(B, Hq, Nq, Nk)` bool with rows 3 and 20 of one head fully masked;
    "rows" `(B, 1, Nq, 1)` float masking whole rows; "keys" `(B, 1, 1, Nk)` float, a learned
    bias per key, some at the lowest value."""
    g = torch.Generator().manual_seed(seed)
    if kind == "padding":
        mask = torch.ones(B, 1, 1, NK, dtype=torch.bool)
        mask[1, ..., 23:] = False
        return mask
    if kind == "heads":
        mask = torch.randn(1, HQ, NQ, NK, generator=g, dtype=dtype)
        mask[torch.rand(mask.shape, generator=g) < 0.2] = float("-inf")
        mask[torch.rand(mask.shape, generator=g) < 0.2] = torch.finfo(dtype).min
        return mask
    if kind == "plane":
        return (2 * torch.randn(NQ, NK, generator=g)).to(dtype)
    if kind == "full":
        mask = torch.rand(B, HQ, NQ, NK, generator=g) < 0.6
        mask[0, 1, [3, 20]] = False
        return mask
    if kind == "keys":
        mask = torch.randn(B, 1, 1, NK, generator=g, dtype=dtype)
        mask[1, ..., ::7] = torch.finfo(dtype).min
        return mask
    mask = torch.zeros(B, 1, NQ, 1, dtype=dtype)
    mask[0, 0, [0, 5, 6]] = float("-inf")
    return mask


def kernel_attention(q, k, v, normalizer, alpha, **kwargs):
    if normalizer in ("softmax", "ssmax"):
        return softmax_attention(q, k, v, **kwargs)
    return entmax_attention(q, k, v, alpha=2.0 if normalizer == "sparsemax" else alpha, **kwargs)


def check_masked(normalizer, alpha, mask, causal_offset=None, grad_mask=False, dtype=torch.float32,
                 block_map=None, seqused_k=None, lengths=(NQ, NK), dims=(16, 24), **modifiers):
    """The kernels with `mask` (and `block_map`, a BlockMap) against the reference, every gradient
    too; `grad_mask`: the float mask requires grad and its gradient is checked."""
    scaled = normalizer in ("ssmax", "entmax")
    q, k, v, s = kernel_leaves(B, HQ, HKV, *lengths, *dims, DEVICE, dtype, scaled)
    mask = mask.to(DEVICE)
    if grad_mask:
        mask.requires_grad_()
    inputs = [q, k, v] + ([s] if scaled else []) + ([mask] if grad_mask else [])
    names = ["dq", "dk", "dv"] + (["ds"] if scaled else []) + (["dmask"] if grad_mask else [])
    flags, size = (None, 128) if block_map is None else (block_map.flags.to(DEVICE), block_map.block_size)
    used = None if seqused_k is None else seqused_k.to(DEVICE)
    out = kernel_attention(q, k, v, normalizer, alpha, length_scale=s, causal_offset=causal_offset,
                           attn_mask=mask, block_map=flags, map_block=size, seqused_k=used, **modifiers)

    def reference(args):
        q_, k_, v_, *rest = args
        s_ = rest.pop(0) if scaled else None
        mask_ = rest.pop(0) if grad_mask else mask.detach().cpu()
        return longattn.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=mask_, normalizer=normalizer, alpha=alpha, length_scale=s_,
            causal_offset=causal_offset, enable_gqa=True, block_map=block_map, seqused_k=seqused_k,
            backend="reference", **modifiers)

    check_kernel_call(out, inputs, reference, dtype, names)


# (normalizer, alpha, mask kind, mask dtype, causal offset, float mask's gradient, extra keywords)
CASES = [
    ("softmax", 1.5, "padding", torch.bool, None, False, {}),
    ("ssmax", 1.5, "heads", torch.float32, 0, True, {}),
    ("softmax", 1.5, "plane", torch.float16, 5, False, {"softcap": 2.0, "window_size": (20, -1),
                                                       "sink": torch.tensor([0.5, -1.0, 2.0, 0.0])}),
    ("softmax", 1.5, "rows", torch.float64, None, False, {}),
    ("ssmax", 1.5, "keys", torch.float32, 3, True, {}),
    ("sparsemax", 2.0, "keys", torch.float32, None, True, {"softcap": 2.0}),
    ("sparsemax", 2.0, "full", torch.bool, 5, False, {}),
    ("sparsemax", 2.0, "heads", torch.float32, None, True, {"alibi_slopes": torch.tensor([0.3, 0.1, 0.2,
                                                                                          0.05])}),
    ("entmax", 1.5, "plane", torch.float32, -3, True, {"window_size": (25, 3)}),
    ("entmax", 1.25, "full", torch.bool, None, False, {"softcap": 3.0}),
    ("entmax", 1.5, "rows", torch.float32, 0, True, {}),
    ("entmax", 1.25, "padding", torch.bool, 0, False, {"sink": torch.tensor([0.5, -1.0, 2.0, 0.0])}),
]


def case_name(normalizer, alpha, kind, mask_dtype, causal_offset, grad_mask, extra):
    name = normalizer + (str(alpha) if normalizer == "entmax" else "")
    grad = ["grad"] if grad_mask else []
    return "-".join([name, kind, str(mask_dtype)[6:], str(causal_offset), *grad, *extra])


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha,kind,mask_dtype,causal_offset,grad_mask,extra", CASES,
                         ids=[case_name(*c) for c in CASES])
def test_matches_the_reference(normalizer, alpha, kind, mask_dtype, causal_offset, grad_mask, extra):
    extra = {name: value.to(DEVICE) if torch.is_tensor(value) else value for name, value in extra.items()}
    check_masked(normalizer, alpha, make_mask(kind, mask_dtype), causal_offset, grad_mask, **extra)


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha,dims", [("ssmax", 1.5, (16, 24)), ("entmax", 1.5, (128, 128))])
def test_mask_with_key_lengths_in_float16(normalizer, alpha, dims):
    """A float mask in float16 inputs beside `seqused_k` (0 and part of the keys), length-scaled:
    n_i counts the keys both allow. At D = 128 entmax's dQ holds 32 rows for the mask's gradient,
    reading the forward's 64-row tile flags."""
    check_masked(normalizer, alpha, make_mask("heads", torch.float16), 2, grad_mask=True, dtype=torch.float16,
                 seqused_k=torch.tensor([0, 50], dtype=torch.int32), dims=dims)


def _document_mask(n, bounds):
    doc = torch.bucketize(torch.arange(n), torch.tensor(bounds), right=True)
    return doc[:, None] == doc[None, :]


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("normalizer,alpha", [("ssmax", 1.5), ("entmax", 1.25)])
def test_block_map_of_a_document_mask(normalizer, alpha):
    """Documents of 30, 34, 36 and 30 tokens, causal: the map of 64-blocks clears the blocks the
    mask leaves empty, and one more the mask allows (rows and keys 64-127), which the map masks:
    with a float mask (which skips nothing itself) the kernels equal the reference given both."""
    mask = _document_mask(130, [30, 64, 100])
    flags = BlockMap.from_mask(mask, 64).flags.clone()
    assert not flags.all() and flags[1, 1]
    flags[1, 1] = False
    bias = torch.zeros(130, 130).masked_fill(~mask, float("-inf"))
    check_masked(normalizer, alpha, bias, 0, grad_mask=True, block_map=BlockMap(flags, 64),
                 lengths=(130, 130))


def _forward_backward(family, q, k, v, backward=True, **kwargs):
    if family == "softmax":
        out, lse = softmax_attention_fwd(q, k, v, 0.25, None, 0.7, **kwargs)
        if backward:
            softmax_attention_bwd(out, q, k, v, out, lse, 0.25, None, 0.7, **kwargs)
    else:
        out, row_max, tau, flags = entmax_attention_fwd(q, k, v, 0.25, 1.5, None, 0.7, **kwargs)
        if backward:
            entmax_attention_bwd(out, q, k, v, row_max, tau, flags, 0.25, 1.5, None, 0.7, **kwargs)


@pytest.mark.skipif(not INTERPRET, reason="counts the Triton interpreter's loads")
@pytest.mark.parametrize("family", ["softmax", "entmax"])
def test_tiles_a_mask_or_map_removes_are_skipped(family, monkeypatch):
    """Over 200 keys of which a mask allows the first 64 (no causal rule), the forward loads K
    exactly as often as over those 64 keys alone, whether a boolean mask removes the other tiles
    or a block map does beside a float mask; a float mask alone removes none. The backward loads
    fewer tiles with the boolean mask than with the float one."""
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 200, 16), torch.randn(1, 1, 200, 16)
    keys = torch.arange(200) < 64
    bias = torch.zeros(200).masked_fill(~keys, float("-inf"))
    cleared = BlockMap.from_mask(keys.view(1, 200), 64).flags

    def loads(k, v, backward=False, **kwargs):
        return count_key_tile_loads(lambda: _forward_backward(family, q, k, v, backward, **kwargs), k,
                                    monkeypatch)

    truncated = loads(k[:, :, :64], v[:, :, :64])
    assert loads(k, v, attn_mask=keys) == truncated
    assert loads(k, v, attn_mask=bias, block_map=cleared, map_block=64) == truncated
    assert loads(k, v, attn_mask=bias) > truncated
    assert loads(k, v, True, attn_mask=keys) < loads(k, v, True, attn_mask=bias)


def test_block_map_from_and_as_a_mask():
    """`from_mask` keeps a block when any entry allows a key (float masks: -inf and the lowest
    value mask) and keeps the dims a mask broadcasts along; `as_mask` repeats each flag over its
    block, so it covers the mask."""
    mask = torch.rand(2, 1, 150, 200) < 0.002
    mask[0, 0, 70, 130] = True
    block_map = BlockMap.from_mask(mask, 64)
    assert block_map.flags.shape == (2, 1, 3, 4)
    expected = mask.new_zeros(2, 1, 3, 4)
    for b, _, r, c in mask.nonzero().tolist():
        expected[b, 0, r // 64, c // 64] = True
    assert torch.equal(block_map.flags, expected)
    assert torch.equal(block_map.as_mask(150, 200) | mask, block_map.as_mask(150, 200))
    padding = torch.zeros(1, 1, 1, 200).masked_fill(torch.arange(200) >= 90, torch.finfo(torch.float32).min)
    flags = BlockMap.from_mask(padding, 64).flags
    assert flags.shape == (1, 1, 1, 4) and flags.flatten().tolist() == [True, True, False, False]
    assert BlockMap(flags, 64).as_mask(150, 200).shape == (1, 1, 1, 200)


def test_block_map_on_the_paths_without_maps():
    """The reference and torch paths fold a map into the mask: each equals the reference given
    the folded mask itself."""
    q, k, v = (torch.randn(1, 2, 150, 16, dtype=torch.float64) for _ in range(3))
    mask = _document_mask(150, [30, 64, 100])
    block_map = BlockMap(BlockMap.from_mask(mask, 64).flags.clone(), 64)
    block_map.flags[1, 1] = False
    folded = mask & block_map.as_mask(150, 150)
    for normalizer in ("softmax", "entmax"):
        want = longattn.scaled_dot_product_attention(q, k, v, folded, normalizer=normalizer,
                                                     backend="reference")
        for backend in ("reference", "torch"):
            got = longattn.scaled_dot_product_attention(q, k, v, mask, normalizer=normalizer,
                                                        block_map=block_map,
                                                        backend=backend)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bad_masks_and_maps_are_refused():
    q, k = torch.randn(1, 2, 9, 16, device=DEVICE), torch.randn(1, 2, 11, 16, device=DEVICE)
    ok = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE)
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        softmax_attention(q, k, k, attn_mask=torch.ones(9, 11, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="attn_mask of shape"):
        entmax_attention(q, k, k, attn_mask=torch.ones(9, 12, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="map_block must be a positive multiple of 64"):
        softmax_attention(q, k, k, block_map=ok, map_block=96)
    with pytest.raises(TypeError, match="block_map must be a bool tensor"):
        softmax_attention(q, k, k, block_map=ok.int())
    with pytest.raises(ValueError, match="block_map .* does not broadcast"):
        entmax_attention(q, k, k, block_map=torch.ones(1, 2, 2, 1, dtype=torch.bool, device=DEVICE))
    qp = torch.randn(9, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dense-only"):
        softmax_attention_fwd(qp, qp, qp, 0.25, None, None, cu, cu, 5, 5, attn_mask=ok)
    # the public function
    cpu_q = torch.randn(1, 2, 9, 16)
    with pytest.raises(TypeError, match="block_map must be None or a longattn.BlockMap"):
        longattn.scaled_dot_product_attention(cpu_q, cpu_q, cpu_q, block_map=ok.cpu())
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 64"):
        longattn.scaled_dot_product_attention(cpu_q, cpu_q, cpu_q, block_map=BlockMap(ok.cpu(), 100))
    with pytest.raises(ValueError, match="does not broadcast to"):
        longattn.scaled_dot_product_attention(cpu_q, cpu_q, cpu_q,
                                              block_map=BlockMap(torch.ones(3, 1, 1, 1, dtype=torch.bool),
                                                                 64))


def test_custom_ops_opcheck_and_compile_with_masks():
    """The ops' schemas take the mask, the block map and the mask's gradient flag (opcheck:
    schema, fake implementations), and torch.compile(fullgraph=True) traces both entries with a
    float mask that requires grad, forward and backward, equal to eager."""
    q, k, v = (torch.randn(2, n, 13, 16, device=DEVICE) for n in (4, 2, 2))
    s = (0.5 + torch.rand(4)).to(DEVICE)
    mask = torch.randn(2, 1, 13, 13, device=DEVICE)
    flags = torch.tensor([[True]], device=DEVICE)
    opcheck_kernel_ops(q, k, v, s, {"attn_mask": mask, "block_map": flags, "map_block": 64})
    out, lse = softmax_attention_fwd(q, k, v, 0.25, 3, s, attn_mask=mask)
    torch.library.opcheck(torch.ops.longattn.softmax_attention_bwd,
                          (torch.randn_like(out), q, k, v, out, lse, 0.25, 3, s, None),
                          {"attn_mask": mask, "mask_grad": True}, test_utils=("test_schema",
                                                                              "test_faketensor"))

    def attend(q, k, v, mask):
        return (softmax_attention(q, k, v, is_causal=True, attn_mask=mask)
                + entmax_attention(q, k, v, alpha=1.25, attn_mask=mask))

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True)):
        leaves_ = [t.clone().requires_grad_() for t in (q, k, v, mask)]
        out = fn(*leaves_)
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves_])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)
