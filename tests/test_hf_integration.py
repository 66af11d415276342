"""`longattn.integrations.transformers` on real transformers models, built from configs with random
weights (tiny: two layers, four query heads over two key/value heads, head dim 8): Llama, Qwen2,
Mistral with a sliding window shorter than the sequence, and Qwen3 with one sliding layer.

Softmax is held to transformers' SDPA implementation (logits, greedy generation with dynamic and
static caches, a training step's gradients); every normalizer to longattn's float64 reference
backend on the same model; packed batches to each document run alone; and a converted model to
itself after save and load."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longattn.integrations.transformers as longattn_hf  # noqa: E402
from longattn.attention import normalizers  # noqa: E402

AutoModelForCausalLM = transformers.AutoModelForCausalLM
VOCAB, LENGTH, WINDOW = 61, 13, 5

FAMILIES = {
    "llama": lambda **kw: transformers.LlamaConfig(**kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**kw),
    "mistral": lambda **kw: transformers.MistralConfig(sliding_window=WINDOW, **kw),
    "qwen3": lambda **kw: transformers.Qwen3Config(use_sliding_window=True, sliding_window=WINDOW,
                                                   max_window_layers=1, head_dim=8, **kw),
}
# Every registered normalizer, as `convert`'s keywords; SSMax with a learned s per head.
NORMALIZERS = [
    pytest.param({"normalizer": name, "alpha": 1.5,
                  "length_scale": "learnable" if normalizers.get(name).length_scale else None}, id=name)
    for name in normalizers.names()
]


def tiny_config(family: str):
    return FAMILIES[family](
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def pair(family: str, dtype=torch.float32, name: str = "longattn_test_softmax"):
    """transformers' SDPA model and the same weights on longattn's softmax (`register`)."""
    longattn_hf.register(name)
    config = tiny_config(family)
    # one config object each: transformers writes the implementation into the config it is given
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    ours = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    sdpa, ours = (m.to(dtype).eval() for m in (sdpa, ours))
    assert sdpa.config._attn_implementation == "sdpa" and ours.config._attn_implementation == name
    ours.load_state_dict(sdpa.state_dict())
    return sdpa, ours


def batch(padding: str, batch_size: int = 3, length: int = LENGTH):
    """Token ids and a 2-D attention mask: rows of lengths `length`, `length - 4` and
    `length - 7`, padded on the `padding` side ("none": every row full)."""
    ids = torch.randint(3, VOCAB, (batch_size, length))
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for row, pad in enumerate((0, 4, 7)[:batch_size] if padding != "none" else ()):
        columns = slice(0, pad) if padding == "left" else slice(length - pad, length)
        mask[row, columns] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def max_diff(a, b, keep):
    return (a.float() - b.float())[keep].abs().max().item()


# ---------------------------------------------------------------------------------------------
# Softmax against SDPA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_logits_equal_sdpa(family, padding, dtype):
    """Within SDPA's own distance to eager attention, on every real (unpadded) position."""
    sdpa, ours = pair(family, dtype)
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    ids, mask = batch(padding)
    keep = mask.bool()
    with torch.no_grad():
        want, got, base = (m(ids, attention_mask=mask).logits for m in (sdpa, ours, eager))
    assert torch.isfinite(got[keep]).all()
    assert max_diff(got, want, keep) <= max_diff(base, want, keep)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_four_d_masks_pass_through(kind):
    """A caller's own 4-D mask (transformers passes it as it is): bool, or float with finfo.min
    where a key is masked, as transformers' eager masks write it."""
    sdpa, ours = pair("llama")
    ids, padding = batch("left")
    allowed = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril() & padding.bool()[:, None, None, :]
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo().min)
    keep = padding.bool()
    with torch.no_grad():
        want, got = (m(ids, attention_mask=mask).logits for m in (sdpa, ours))
    assert max_diff(got, want, keep) == 0


def test_is_causal_false_kwarg():
    """`is_causal=False` through the model's keywords: bidirectional, as SDPA's implementation."""
    sdpa, ours = pair("qwen2")
    ids, _ = batch("none")
    with torch.no_grad():
        want, got = (m(ids, is_causal=False).logits for m in (sdpa, ours))
        causal = ours(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - causal).abs().max() > 1e-3


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_sdpa(family, cache):
    """Left-padded prompts, twelve new tokens: the prefill and every decoding step through the
    cache (past the sliding window) pick SDPA's tokens."""
    sdpa, ours = pair(family)
    ids, mask = batch("left")
    settings = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "cache_implementation": cache,
                "pad_token_id": 0}
    with torch.no_grad():
        want = sdpa.generate(ids, attention_mask=mask, **settings)
        got = ours.generate(ids, attention_mask=mask, **settings)
    assert want.shape[1] == LENGTH + 12
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_equal_sdpa(family):
    sdpa, ours = pair(family)
    ids, mask = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    for model in (sdpa, ours):
        model.train()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(sdpa.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Every normalizer


def converted(family: str, settings: dict, dtype=torch.float32, backend="torch"):
    model = AutoModelForCausalLM.from_config(tiny_config(family)).to(dtype)
    longattn_hf.convert(model, **settings, backend=backend, initial_length_scale=0.4)
    return model


@pytest.mark.parametrize("settings", NORMALIZERS)
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_every_normalizer_trains_as_its_reference(family, settings):
    """A training step (left padding, so masked keys and empty rows) on the torch path, float32:
    the loss and every gradient, learned s included, match the float64 reference backend's on
    the same weights; all finite."""
    model = converted(family, settings)
    reference = copy.deepcopy(model).double()
    longattn_hf.convert(reference, **settings, backend="reference")
    ids, mask = batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    losses = [m(ids, attention_mask=mask, labels=labels).loss for m in (model, reference)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1].to(losses[0].dtype), rtol=1e-5, atol=1e-6)
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-3, atol=1e-5, msg=name)
    if settings["length_scale"] == "learnable":
        s = model.model.layers[0].self_attn.longattn_length_scale
        assert s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Packed batches


def packed_batch(lengths, **collator_kwargs):
    from transformers import DataCollatorWithFlattening

    docs = [{"input_ids": torch.randint(3, VOCAB, (n,)).tolist()} for n in lengths]
    collate = DataCollatorWithFlattening(return_tensors="pt", **collator_kwargs)
    return docs, collate(docs)


@pytest.mark.parametrize("settings", NORMALIZERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_equal_each_alone(family, settings):
    """`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`: each document's logits as if
    it ran alone, also where a document is longer than Mistral's and Qwen3's sliding window (the
    block-diagonal route)."""
    model = converted(family, settings).eval()
    docs, packed = packed_batch([7, 11, 4], return_flash_attn_kwargs=True)
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        start = 0
        for doc in docs:
            n = len(doc["input_ids"])
            alone = model(torch.tensor([doc["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


@pytest.mark.parametrize("lengths_as", ["int", "tensor"])
def test_packed_kwargs_as_transformers_passes_them(lengths_as):
    """int32 or int64 offsets, int or 0-d tensor lengths, and packed `position_ids` alone (the
    block-diagonal mask transformers builds): one result."""
    model = converted("llama", {"normalizer": "entmax", "alpha": 1.5, "length_scale": None}).eval()
    docs, packed = packed_batch([5, 9, 3], return_flash_attn_kwargs=True)
    ids, positions = packed["input_ids"], packed["position_ids"]
    kwargs = {k: packed[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k")}
    kwargs.update({k: packed[k] if lengths_as == "int" else torch.tensor(packed[k])
                   for k in ("max_length_q", "max_length_k")})
    with torch.no_grad():
        want = model(ids, position_ids=positions, use_cache=False).logits  # a cache turns packing off
        kwargs = {k: v.long() if k.startswith("cu_") else v for k, v in kwargs.items()}
        got64 = model(ids, position_ids=positions, **kwargs).logits
        kwargs = {k: v.int() if k.startswith("cu_") else v for k, v in kwargs.items()}
        got32 = model(ids, position_ids=positions, **kwargs).logits
    torch.testing.assert_close(got64, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got32, got64, rtol=0, atol=0)


def test_packed_training_with_dropout_keeps_documents_apart():
    """Dropout is not varlen's: the block-diagonal route serves it. With the same seed its loss
    equals the position-ids route's (transformers' own mask), and gradients are finite."""
    config = tiny_config("llama")
    config.attention_dropout = 0.25
    model = AutoModelForCausalLM.from_config(config)
    longattn_hf.convert(model, normalizer="sparsemax", backend="torch")
    model.train()
    _, packed = packed_batch([6, 8], return_flash_attn_kwargs=True)
    losses = []
    for kwargs in (packed, {k: packed[k] for k in ("input_ids", "labels", "position_ids")}):
        torch.manual_seed(1)
        losses.append(model(**kwargs, use_cache=False).loss)  # a cache turns transformers' packing off
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    losses[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# Converting, saving, loading


@pytest.mark.parametrize("settings", NORMALIZERS)
def test_convert_save_load_round_trip(tmp_path, settings):
    """The config records the settings; a learned s survives save and load, also from a sharded
    checkpoint; the reloaded model gives the same logits. transformers' own loader drops the s,
    and the model then refuses to run rather than run something else."""
    model = converted("qwen2", settings).eval()
    if settings["length_scale"] == "learnable":
        with torch.no_grad():
            for i, layer in enumerate(longattn_hf.attention_layers(model)):
                layer.longattn_length_scale.copy_(torch.tensor([0.3, 0.5, 0.7, 0.9]) + i)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = longattn_hf.from_pretrained(tmp_path).eval()
    assert loaded.config.longattn == model.config.longattn
    assert loaded.config._attn_implementation == longattn_hf.FROM_CONFIG
    for a, b in zip(longattn_hf.attention_layers(model), longattn_hf.attention_layers(loaded)):
        s_a, s_b = (getattr(layer, longattn_hf.LENGTH_SCALE, None) for layer in (a, b))
        assert (s_a is None) == (s_b is None)
        if s_a is not None:
            assert torch.equal(s_a, s_b)
    ids, mask = batch("left")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, want, rtol=0, atol=0)
    if settings["length_scale"] == "learnable":
        plain = AutoModelForCausalLM.from_pretrained(tmp_path)
        with pytest.raises(ValueError, match="has no learned length scale"):
            plain(ids)


def test_bf16_and_variant_round_trip(tmp_path):
    """A bfloat16 model saved under a variant name: its s come back in bfloat16, logits exact.
    (Built in bfloat16 and its s cast alone: `.to()` would also cast RoPE's float32 buffer, which
    transformers' loading keeps in float32, and the logits would differ for that alone.)"""
    model = AutoModelForCausalLM.from_config(tiny_config("mistral"), dtype=torch.bfloat16).eval()
    longattn_hf.convert(model, normalizer="ssmax", length_scale="learnable", initial_length_scale=0.4)
    for layer in longattn_hf.attention_layers(model):
        layer.longattn_length_scale.data = layer.longattn_length_scale.data.to(torch.bfloat16)
    model.save_pretrained(tmp_path, variant="v1")
    loaded = longattn_hf.from_pretrained(tmp_path, variant="v1", dtype=torch.bfloat16).eval()
    s = loaded.model.layers[1].self_attn.longattn_length_scale
    assert s.dtype == torch.bfloat16 and torch.equal(s, model.model.layers[1].self_attn.longattn_length_scale)
    ids, mask = batch("left")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, want, rtol=0, atol=0)


def test_from_pretrained_reports_no_unexpected_keys(tmp_path, capsys):
    """Also for a class with patterns of its own (GPT-NeoX), which are as they were afterwards."""
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4)
    for model in (converted("llama", {"normalizer": "ssmax", "length_scale": "learnable"}),
                  AutoModelForCausalLM.from_config(config)):
        longattn_hf.convert(model, normalizer="ssmax", length_scale="learnable")
        before = list(type(model)._keys_to_ignore_on_load_unexpected or [])
        model.save_pretrained(tmp_path / type(model).__name__)
        capsys.readouterr()
        loaded = longattn_hf.from_pretrained(tmp_path / type(model).__name__)
        assert "UNEXPECTED" not in capsys.readouterr().err
        assert list(type(model)._keys_to_ignore_on_load_unexpected or []) == before
        assert len([n for n, _ in loaded.named_parameters() if n.endswith(longattn_hf.LENGTH_SCALE)]) == 2


def test_convert_again_replaces_the_settings():
    model = converted("llama", {"normalizer": "ssmax", "length_scale": "learnable"})
    longattn_hf.convert(model, normalizer="entmax", alpha=1.25)
    assert model.config.longattn["normalizer"] == "entmax" and model.config.longattn["alpha"] == 1.25
    assert not any(hasattr(m, longattn_hf.LENGTH_SCALE) for m in longattn_hf.attention_layers(model))
    assert not any(name.endswith(longattn_hf.LENGTH_SCALE) for name, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# torch.compile and the Triton backend


@pytest.mark.parametrize("settings", NORMALIZERS)
def test_compile_fullgraph(settings):
    """The converted model's forward and backward under `torch.compile(fullgraph=True)` (one
    graph: a break would raise) give eager's loss and gradients."""
    model = converted("llama", settings)
    ids, mask = batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for run in (model, compiled):
        model.zero_grad()
        loss = run(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalizer", ["softmax", "entmax"])
def test_triton_backend_runs_what_the_kernels_serve(normalizer):
    """backend="triton" (the interpreter, float32): unpadded batches, packed documents and a
    left-padded batch (its mask read by the kernels) run on the kernels and match the torch
    path, which "auto" takes on CPU."""
    models = {b: converted("llama", {"normalizer": normalizer, "length_scale": None}, backend=b).eval()
              for b in ("triton", "torch", "auto")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    models["auto"].load_state_dict(models["torch"].state_dict())
    ids, mask = batch("none", batch_size=1, length=9)
    _, packed = packed_batch([4, 5], return_flash_attn_kwargs=True)
    packed.pop("labels")
    with torch.no_grad():
        for inputs in ({"input_ids": ids}, packed):
            got, want = (models[b](**inputs).logits for b in ("triton", "torch"))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        ids, mask = batch("left", batch_size=2, length=9)
        torch.testing.assert_close(models["triton"](ids, attention_mask=mask).logits,
                                   models["torch"](ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(models["auto"](ids, attention_mask=mask).logits,
                                   models["torch"](ids, attention_mask=mask).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# What it refuses


def test_gemma2_soft_capping_is_eagers():
    """Gemma 2's logit soft-capping (and its sliding layers, window 4 of 9 tokens) reaches the
    call as `softcap`: longattn's softmax gives the logits of transformers' eager attention."""
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attn_logit_softcapping=1.0,
        sliding_window=4,
    )
    name = longattn_hf.register("longattn_gemma", backend="torch")
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # large logits and values, so that the cap and the weights show in the output
        for layer in eager.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.mul_(20.0)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(name)
    uncapped_config = copy.deepcopy(config)
    uncapped_config.attn_logit_softcapping = None
    uncapped = AutoModelForCausalLM.from_config(uncapped_config, attn_implementation=name).eval()
    uncapped.load_state_dict(eager.state_dict())
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
        assert (uncapped(ids).logits - eager(ids).logits).abs().max() > 1e-2  # the cap is felt


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_gpt_oss_sinks_are_eagers(packed):
    """gpt-oss's learned sinks (`s_aux`) and its sliding layers reach the call as `sink` and a
    window: longattn's softmax gives the logits of transformers' eager attention, packed
    documents each their own, and the sinks get their gradient."""
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
        max_position_embeddings=64, sliding_window=4, rope_parameters={"rope_type": "default",
                                                                       "rope_theta": 1e4},
    )
    name = longattn_hf.register("longattn_sinks", backend="torch")
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # large logits and sinks, so that both show in the output
        for layer in eager.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.mul_(10.0)
            layer.self_attn.sinks.copy_(torch.linspace(-2.0, 3.0, 4))
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(name)
    if packed:
        docs, batch = packed_batch([7, 5], return_flash_attn_kwargs=True)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        got = ours(**inputs).logits[0]
        want = torch.cat([eager(torch.tensor([d["input_ids"]])).logits[0] for d in docs])
    else:
        ids = torch.randint(3, VOCAB, (2, 9))
        got, want = ours(ids).logits, eager(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().mean().backward()
    want.square().mean().backward()
    for a, b in zip(ours.model.layers, eager.model.layers, strict=True):
        torch.testing.assert_close(a.self_attn.sinks.grad, b.self_attn.sinks.grad, rtol=1e-4, atol=1e-6)
        assert a.self_attn.sinks.grad.abs().max() > 0


def test_refuses_what_would_change_the_model():
    """T5's position bias is not longattn's yet: it raises. output_attentions warns and returns
    no weights, as SDPA's implementation does."""
    longattn_hf.register("longattn_test")
    llama = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="longattn_test")
    layer = llama.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    attention = transformers.AttentionInterface()["longattn_test"]
    with pytest.raises(ValueError, match="position_bias"):
        attention(layer, q, kv, kv, None, position_bias=torch.zeros(1, 4, 6, 6))
    with pytest.warns(UserWarning, match="output_attentions"):
        out, weights = attention(layer, q, kv, kv, None, output_attentions=True)
    assert weights is None and out.shape == (1, 6, 4, 8)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"name": "my_sdpa"}, ValueError, "transformers'"),
    ({"name": "org/kernel"}, ValueError, "letters, digits"),
    ({"name": "eager"}, ValueError, "transformers'"),
    ({"name": longattn_hf.FROM_CONFIG}, ValueError, "taken"),
    ({"normalizer": "nope"}, ValueError, "normalizer"),
    ({"alpha": 3.0}, ValueError, "alpha"),
    ({"length_scale": "learnable"}, ValueError, "convert"),
    ({"length_scale": "big"}, TypeError, "length_scale"),
    ({"backend": "cuda"}, ValueError, "backend"),
])
def test_register_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        longattn_hf.register(**kwargs)


def test_gpt_neox_converts():
    """A family whose layers keep `head_size`, not `head_dim`: found, and softmax equals SDPA."""
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=64)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_config(config).eval()
    ours.load_state_dict(sdpa.state_dict())
    longattn_hf.convert(ours, normalizer="softmax")
    assert len(longattn_hf.attention_layers(ours)) == 2
    ids, mask = batch("left")
    with torch.no_grad():
        want, got = (m(ids, attention_mask=mask).logits for m in (sdpa, ours))
    assert max_diff(got, want, mask.bool()) == 0


def test_convert_refuses_what_it_cannot_switch():
    """Falcon's attention does not go through AttentionInterface (transformers would only log
    that, and the model would run softmax); a composite model's parts are the caller's choice."""
    falcon = AutoModelForCausalLM.from_config(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="does not go through transformers' AttentionInterface"):
        longattn_hf.convert(falcon, normalizer="entmax")
    llava = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, image_size=8, patch_size=4),
        text_config=tiny_config("llama")))
    with pytest.raises(ValueError, match="composite model"):
        longattn_hf.convert(llava, normalizer="entmax")


def test_packed_rows_past_the_documents():
    """Padding rows after the last document: the per-document loop names the bad offsets, for
    Llama and for Mistral's sliding window alike (varlen serves both)."""
    _, packed = packed_batch([7, 4], return_flash_attn_kwargs=True)
    ids = torch.cat((packed["input_ids"], torch.zeros(1, 3, dtype=torch.long)), dim=1)
    kwargs = {k: packed[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    with torch.no_grad():
        llama = converted("llama", {"normalizer": "softmax", "length_scale": None}).eval()
        with pytest.raises(ValueError, match="cu_seqlens_q must end at the total length 14; got 11"):
            llama(ids, **kwargs)
        mistral = converted("mistral", {"normalizer": "softmax", "length_scale": None}).eval()
        with pytest.raises(ValueError, match="cu_seqlens_q must end at the total length 14; got 11"):
            mistral(ids, **kwargs)


def test_convert_and_load_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        longattn_hf.convert(torch.nn.Linear(2, 2), normalizer="softmax")
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match="normalizer"):
        longattn_hf.convert(model, normalizer="softmaxx")
    with pytest.raises(TypeError, match="initial_length_scale"):
        longattn_hf.convert(model, normalizer="ssmax", length_scale="learnable", initial_length_scale=None)
    model.set_attn_implementation(longattn_hf.FROM_CONFIG)  # not converted: nothing recorded
    with pytest.raises(ValueError, match="convert"), warnings.catch_warnings():
        model(torch.randint(3, VOCAB, (1, 4)))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no longattn settings"):
        longattn_hf.from_pretrained(tmp_path)


@pytest.mark.parametrize("n_q", [1, 10])
def test_sliding_window_without_a_mask_reaches_the_call_as_window_size(n_q):
    """When transformers skips the mask (causal prefill, decoding), a layer's `sliding_window` of
    w becomes `window_size=(w - 1, 0)` around the last query's position: the query sees its own
    key and the w - 1 before it, as transformers' mask would say."""
    import longattn

    from helpers import window_keys

    window, n_k = 4, 10
    q = torch.randn(1, 4, n_q, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, n_k, 8, dtype=torch.float64)
    settings = longattn_hf.Settings("entmax", 1.5, None, "torch")
    layer = torch.nn.Module()
    got, _ = longattn_hf._attend(settings, layer, q, k, v, None, 0.0, None, None, {"sliding_window": window})
    allowed = window_keys(n_q, n_k, (window - 1, 0), n_k - n_q)
    want = longattn.scaled_dot_product_attention(q, k, v, attn_mask=allowed, normalizer="entmax",
                                                 enable_gqa=True, backend="reference")
    torch.testing.assert_close(got, want.transpose(1, 2))
