"""The reference Transformer: equal across backends, KV-cache generation equal to the full
forward (SSMax's n_i and ALiBi included), checkpoints, and bad configs."""

import pytest
import torch

from longattn.models import Transformer, TransformerConfig
from longattn.models.transformer import POSITIONAL, rotate

from conftest import INTERPRET

# (normalizer, alpha, length_scale): every normalizer, and a length-scaled sparse one
ATTENTION = [
    pytest.param("softmax", 1.5, None, id="softmax"),
    pytest.param("ssmax", 1.5, 0.7, id="ssmax"),
    pytest.param("sparsemax", 2.0, None, id="sparsemax"),
    pytest.param("entmax", 1.5, None, id="entmax1.5"),
    pytest.param("entmax", 1.3, 0.6, id="entmax1.3-ls"),
]


def make_model(normalizer, alpha, length_scale, positional="partial_rope", backend="torch", **kw):
    """A tiny float64 model with weights scaled up, so attention rows are peaked and the sparse
    normalizers give exact zeros: a wrong mask or n_i would change the logits."""
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=41, d_model=32, n_layer=2, n_head=4, n_kv_head=2, positional=positional,
        normalizer=normalizer, alpha=alpha, length_scale=length_scale, backend=backend, **kw,
    )
    model = Transformer(cfg).double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(3.0)
            block.attn.kv_proj.weight.mul_(3.0)
            if isinstance(block.attn.attend.length_scale, torch.nn.Parameter):  # heads differ
                block.attn.attend.length_scale.mul_(torch.linspace(0.5, 1.5, cfg.n_head, dtype=torch.float64))
    return model.eval()


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("normalizer, alpha, length_scale", ATTENTION)
def test_forward_equal_across_backends(normalizer, alpha, length_scale):
    idx = torch.randint(0, 41, (2, 23))
    ref = make_model(normalizer, alpha, length_scale, backend="reference")(idx)
    for backend in ("torch", "auto"):
        out = make_model(normalizer, alpha, length_scale, backend=backend)(idx)
        assert relative_error(out, ref) < 1e-12, backend


def test_forward_equal_on_triton_backend():
    """One tiny SSMax case through the Triton kernels: the interpreter on CPU (conftest sets
    TRITON_INTERPRET=1), compiled on a GPU; float32, the kernels' dtype."""
    device = "cpu" if INTERPRET else "cuda"
    idx = torch.randint(0, 41, (1, 9), device=device)
    ref = make_model("ssmax", 1.5, 0.7, backend="reference").float().to(device)(idx)
    out = make_model("ssmax", 1.5, 0.7, backend="triton").float().to(device)(idx)
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("normalizer, alpha, length_scale", ATTENTION)
def test_sliding_window_layers(normalizer, alpha, length_scale):
    """`sliding_window=w`: each position sees itself and the w - 1 before it, equal across
    backends and with a KV cache, and different from full attention."""
    idx = torch.randint(0, 41, (2, 17))
    model = make_model(normalizer, alpha, length_scale, sliding_window=4)
    ref = make_model(normalizer, alpha, length_scale, backend="reference", sliding_window=4)(idx)
    full = model(idx)
    assert relative_error(full, ref) < 1e-12
    assert relative_error(full, make_model(normalizer, alpha, length_scale)(idx)) > 1e-3
    cache = model.new_cache()
    steps = [model(idx[:, :6], cache)] + [model(idx[:, t:t + 1], cache) for t in range(6, 17)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)


def test_sliding_window_and_alibi_on_triton_backend():
    """The window and ALiBi reach the kernels as a window and slopes, not as a dense mask,
    prefill and decoding with a KV cache alike."""
    device = "cpu" if INTERPRET else "cuda"
    idx = torch.randint(0, 41, (1, 21), device=device)
    for normalizer, alpha, length_scale in (("ssmax", 1.5, 0.7), ("entmax", 1.3, 0.6)):
        kw = dict(positional="alibi", sliding_window=6)
        ref = make_model(normalizer, alpha, length_scale, backend="reference", **kw).float().to(device)
        out = make_model(normalizer, alpha, length_scale, backend="triton", **kw).float().to(device)
        assert relative_error(out(idx), ref(idx)) < 1e-5
        cache = out.new_cache()
        steps = torch.cat([out(idx[:, :18], cache)] + [out(idx[:, t:t + 1], cache) for t in range(18, 21)], 1)
        assert relative_error(steps, ref(idx)) < 1e-5


@pytest.mark.parametrize("positional", POSITIONAL)
@pytest.mark.parametrize("normalizer, alpha, length_scale", ATTENTION)
def test_kv_cache_equals_full_forward(normalizer, alpha, length_scale, positional):
    model = make_model(normalizer, alpha, length_scale, positional, token_shift=positional == "nope")
    idx = torch.randint(0, 41, (2, 19))
    full = model(idx)
    cache = model.new_cache()
    steps = [model(idx[:, :7], cache)]  # prefill, then one token at a time
    steps += [model(idx[:, t : t + 1], cache) for t in range(7, 19)]
    assert cache.length == 19 and all(k.shape[2] == 19 for k in cache.keys)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)


def test_kv_cache_in_uneven_chunks_with_token_shift():
    model = make_model("entmax", 1.5, 0.5, "alibi", token_shift=True)
    idx = torch.randint(0, 41, (3, 20))
    cache = model.new_cache()
    chunks = [model(idx[:, a:b], cache) for a, b in ((0, 1), (1, 9), (9, 10), (10, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(idx), rtol=1e-12, atol=1e-12)


def test_generate_matches_greedy_full_forward():
    """`generate` (KV cache) picks the same tokens as re-running the full forward each step."""
    model = make_model("ssmax", 1.5, 0.7, "alibi")
    prompt = torch.randint(0, 41, (2, 6))
    out = model.generate(prompt, 8)
    seq = prompt
    for _ in range(8):
        seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq)


def test_ssmax_learns_its_scale_and_differs_from_softmax():
    """The per-head s is a Parameter that gets a gradient, and length scaling changes the output."""
    model = make_model("ssmax", 1.5, 0.7)
    idx = torch.randint(0, 41, (2, 12))
    model(idx).square().mean().backward()
    s = model.blocks[0].attn.attend.length_scale
    assert isinstance(s, torch.nn.Parameter) and s.shape == (4,) and s.grad.abs().sum() > 0
    softmax = make_model("softmax", 1.5, None)
    assert relative_error(softmax(idx), model(idx)) > 1e-3


def test_rotate_partial_keeps_the_rest_and_preserves_dot_products_by_offset():
    x = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)
    turned = rotate(x, pos, 4, 10000.0)
    assert torch.equal(turned[..., 4:], x[..., 4:])
    # RoPE: <R(i) q, R(j) k> depends on i - j only
    q, k = torch.randn(2, 8, dtype=torch.float64)
    def dot(i, j):
        a = rotate(q.view(1, 1, 1, 8), torch.tensor([i]), 8, 10000.0)
        b = rotate(k.view(1, 1, 1, 8), torch.tensor([j]), 8, 10000.0)
        return (a * b).sum()
    torch.testing.assert_close(dot(7, 3), dot(104, 100))
    assert not torch.allclose(dot(7, 3), dot(7, 4))


def test_checkpoint_round_trip(tmp_path):
    model = make_model("entmax", 1.3, 0.6, "alibi")
    idx = torch.randint(0, 41, (2, 10))
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = Transformer.load(path).eval()
    assert loaded.embed.weight.dtype == torch.float64
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    other = Transformer.load(path, backend="reference").eval()
    torch.testing.assert_close(other(idx), model(idx), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown config"):
        Transformer.load(path, not_a_field=1)


@pytest.mark.parametrize("field, value", [
    ("d_model", 30), ("n_kv_head", 3), ("positional", "sinusoid"), ("normalizer", "relu"),
    ("alpha", 2.5), ("backend", "cuda"), ("rope_fraction", 0.0), ("length_scale", -1.0), ("vocab_size", 0),
    ("sliding_window", 0), ("sliding_window", 2.5),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TransformerConfig(**{field: value})


def test_bad_inputs():
    model = make_model("softmax", 1.5, None)
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -1)
