"""Hugging Face transformers: longattn's normalizers as the attention of any model whose layers call
transformers' `AttentionInterface` (Llama, Qwen2, Qwen3, Mistral and the other decoders)::

    import longattn.integrations.transformers as longattn_hf

    longattn_hf.register("longattn_entmax", normalizer="entmax", alpha=1.5)            # a name
    model = AutoModelForCausalLM.from_config(config, attn_implementation="longattn_entmax")

    model = longattn_hf.convert(model, normalizer="ssmax", length_scale="learnable")   # in place
    model.save_pretrained(path)
    model = longattn_hf.from_pretrained(path)      # the same normalizer and every learned s

What transformers hands an attention function, and what this one does with it:
- `attention_mask`: what the mask function registered with it (transformers' own `sdpa_mask`)
  built: None where a causal flag says it all, else a 4-D bool mask (True = attend) holding the
  padding, the sliding window and packed documents. A 4-D float mask passes as longattn's float
  mask (`-inf` and `finfo.min` mask a key, as transformers writes padding).
- `is_causal` (the argument, else the layer's attribute): SDPA's rule, so that caches see what
  SDPA sees: causal only with no mask and more than one query, top-left, and the keys past the
  queries dropped (they are an empty static cache's slots).
- `cu_seq_lens_q/k`, `max_length_q/k` (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`):
  `longattn.varlen_attention`, each document alone, causal bottom-right within it, a layer's
  sliding window of `w` as `window_size=(w - 1, 0)`. Where varlen cannot serve (dropout), the
  same documents run through a block-diagonal mask instead. Packed `position_ids` alone get the
  block-diagonal mask transformers builds, as with SDPA.
- `sliding_window` with no mask (transformers skipped it: causal prefill, decoding) becomes the
  same `window_size`, so it reaches the kernels without a dense mask.
- Grouped-query heads go as they are (`enable_gqa`): K and V are never repeated.
- `softcap` (Gemma 2's logit soft-capping) goes to the call's `softcap`, attention sinks
  (`s_aux`, gpt-oss's learned per-head logits) to its `sink`, with their gradient.
  `position_bias` (T5's learned relative bias) raises rather than run a different model.
  `output_attentions=True` warns and returns no weights, as SDPA's implementation does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from longattn import __version__
from longattn.attention import checks
from longattn.attention.functional import scaled_dot_product_attention
from longattn.attention.varlen import varlen_attention

# The implementation `convert` sets: it reads the settings from the model's config record.
FROM_CONFIG = "longattn_from_config"
CONFIG_KEY = "longattn"  # the record's attribute on a converted model's config (and in config.json)
LENGTH_SCALE = "longattn_length_scale"  # each attention layer's learned s, shape (Hq,)

__all__ = ["FROM_CONFIG", "LENGTH_SCALE", "attention_layers", "convert", "from_pretrained", "register"]


@dataclass(frozen=True)
class Settings:
    """What runs in every attention layer: as `longattn.scaled_dot_product_attention`'s keywords,
    with `length_scale="learnable"` for a parameter per layer (`LENGTH_SCALE`)."""

    normalizer: str = "softmax"
    alpha: float = 1.5
    length_scale: float | str | None = None
    backend: str = "auto"

    @classmethod
    def from_record(cls, record: dict) -> Settings:
        """The settings of a config record (`convert` writes it; its other keys are ignored)."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__ if name in record})


def _settings(normalizer, alpha, length_scale, backend) -> Settings:
    learnable = isinstance(length_scale, str) and length_scale == "learnable"
    if not (length_scale is None or learnable or checks.is_real_number(length_scale)):
        raise TypeError(
            "length_scale must be None, a real number or 'learnable' (a parameter per layer and head); got "
            f"{length_scale!r}"
        )
    if checks.is_real_number(length_scale):
        length_scale = checks.check_length_scale(length_scale, 1, torch.device("cpu"))
    return Settings(checks.check_normalizer(normalizer), checks.check_alpha(alpha), length_scale,
                    checks.check_backend(backend))


# ---------------------------------------------------------------------------------------------
# The attention function transformers calls


def _attention_function(settings: Settings | None):
    """transformers' attention signature over fixed settings, or (None) over each layer's config
    record."""

    def longattn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           is_causal=None, **kwargs):
        chosen = settings if settings is not None else _recorded_settings(module)
        return _attend(chosen, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    return longattn_attention


def _attend(settings, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """query `(B, Hq, Nq, D)`, key and value `(B, Hkv, Nk, D)`; returns `((B, Nq, Hq, Dv), None)`."""
    _refuse_what_changes_the_logits(kwargs)
    options = {"normalizer": settings.normalizer, "alpha": settings.alpha, "backend": settings.backend,
               "length_scale": _length_scale(settings, module), "scale": scaling,
               "softcap": kwargs.get("softcap"), "sink": kwargs.get("s_aux")}
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = kwargs.get("sliding_window")
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        return _packed(query, key, value, kwargs, causal, window, dropout, options), None
    return _dense(query, key, value, attention_mask, causal, window, dropout, options), None


def _dense(query, key, value, attention_mask, causal, window, dropout, options):
    n_q, n_k = query.shape[2], key.shape[2]
    # transformers' SDPA rule: a mask, when there is one, holds the causal pattern, and one query
    # (decoding) sees every cached key.
    causal = bool(causal) and attention_mask is None and n_q > 1
    if causal and n_k > n_q:
        # transformers skips the mask of a causal call with more keys than queries only when
        # prefilling an empty static cache: the keys past the queries are its empty slots.
        key, value = key[:, :, :n_q], value[:, :, :n_q]
        n_k = n_q
    window_args = {}
    if attention_mask is None and window is not None and n_k > window:
        if not (causal or n_q == 1):
            raise ValueError(f"a bidirectional sliding window of {window} over {n_k} keys needs the mask "
                             "transformers builds for it; got attention_mask=None")
        # transformers' window of w: the query's own key and the w - 1 before it, the query
        # being the last position (decoding) or the keys' own (causal prefill, n_k = n_q)
        window_args = {"causal_offset": "bottom_right", "window_size": (window - 1, 0)}
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                       is_causal=causal, enable_gqa=True, **window_args, **options)
    return out.transpose(1, 2).contiguous()


def _packed(query, key, value, kwargs, causal, window, dropout, options):
    """The documents of `cu_seq_lens_q/k`, packed along the batch and sequence axes (flattened as
    transformers' flash-attention path flattens them)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        raise ValueError("packed sequences need both cu_seq_lens_q and cu_seq_lens_k; got only one")
    batch, h_q, n_q, _ = query.shape
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if window is not None and not causal:
        raise ValueError("a sliding window over packed documents is supported with causal attention only")
    if dropout > 0:
        out = _packed_through_mask(q, k, v, cu_q, cu_k, causal, window, dropout, options)
    else:
        window_size = None if window is None else (window - 1, 0)  # w keys, the query's own last
        offset = "bottom_right" if causal else None
        out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal_offset=offset,
                               window_size=window_size, **options)
    return out.view(batch, n_q, h_q, -1)


def _packed_through_mask(q, k, v, cu_q, cu_k, causal, window, dropout, options):
    """Packed documents as one dense call with a block-diagonal mask: what varlen cannot serve yet
    (dropout). Causal bottom-right within each document, as varlen's; a window
    of `w` keeps the `w` keys up to the query's own position. Builds a `total x total` mask."""
    doc_q, pos_q = _documents(cu_q, q.shape[0])
    doc_k, pos_k = _documents(cu_k, k.shape[0])
    # rows past the last document (padding after it) belong to none: they attend nothing, give 0
    allowed = (doc_q[:, None] == doc_k[None, :]) & (doc_q < cu_q.numel() - 1)[:, None]
    if causal:
        lengths_q = torch.cat((cu_q.diff(), cu_q.new_zeros(1)))  # and 0 for past the end
        lengths_k = torch.cat((cu_k.diff(), cu_k.new_zeros(1)))
        last_key = pos_q + (lengths_k - lengths_q)[doc_q]  # the query's position among its keys
        allowed &= pos_k[None, :] <= last_key[:, None]
        if window is not None:
            allowed &= pos_k[None, :] > last_key[:, None] - window
    out = scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=allowed,
                                       dropout_p=dropout, enable_gqa=True, **options)
    return out[0].transpose(0, 1)


def _documents(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed row's document and its position in it."""
    rows = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)
    return doc, rows - cu_seqlens.long()[doc]


def _refuse_what_changes_the_logits(kwargs) -> None:
    if kwargs.get("position_bias") is not None:
        raise ValueError("position_bias (a learned relative bias, as in T5) is not supported by longattn's "
                         "transformers integration; running without it would change the model")
    if kwargs.get("output_attentions"):
        warnings.warn("longattn's attention does not return attention weights (output_attentions=True): "
                      "they are None; longattn.attention.attention_weights computes them for inspection",
                      stacklevel=3)


def _length_scale(settings: Settings, module):
    if settings.length_scale != "learnable":
        return settings.length_scale
    s = getattr(module, LENGTH_SCALE, None)
    if s is None:
        raise ValueError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no learned length "
            f"scale `{LENGTH_SCALE}`, but its model's config records length_scale='learnable': build the "
            "model with longattn.integrations.transformers.convert(...) or load it with "
            "longattn.integrations.transformers.from_pretrained(path)"
        )
    return s


def _recorded_settings(module) -> Settings:
    record = getattr(getattr(module, "config", None), CONFIG_KEY, None)
    if not isinstance(record, dict):
        raise ValueError(
            f"attn_implementation={FROM_CONFIG!r} reads the settings that convert() records in the model's "
            f"config (`config.{CONFIG_KEY}`); {type(module).__name__}'s config has none: call "
            "longattn.integrations.transformers.convert(model, normalizer=...) or register() a name"
        )
    return Settings.from_record(record)


# ---------------------------------------------------------------------------------------------
# Registering, converting, loading

_RESERVED = re.compile(r"sdpa|flash|flex|paged|eager|kernels|[/|:]")  # names transformers reads itself
_REGISTERED: set[str] = set()


def register(name: str = "longattn", *, normalizer: str = "softmax", alpha: float = 1.5,
             length_scale: float | None = None, backend: str = "auto") -> str:
    """Registers longattn's attention under `name` with transformers, both the attention function
    (`AttentionInterface`) and its mask function (`AttentionMaskInterface`: transformers' SDPA
    masks, so padding, sliding windows, caches and packing reach it), so that
    ``AutoModelForCausalLM.from_config(config, attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` runs it. The settings are
    :func:`longattn.scaled_dot_product_attention`'s keywords; a learnable ``s`` per layer is
    :func:`convert`'s. Registering a name again replaces its settings. Returns `name`."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", name):
        raise ValueError(f"name must be letters, digits, _ and -, starting with a letter; got {name!r}")
    taken = name in AttentionInterface() and name not in _REGISTERED
    if _RESERVED.search(name) or name == FROM_CONFIG or taken:
        raise ValueError(f"name {name!r} is transformers' or taken: transformers gives names with 'sdpa', "
                         f"'flash', 'flex', 'paged', 'eager', 'kernels', '/', '|' or ':' meanings of its own")
    if isinstance(length_scale, str) and length_scale == "learnable":
        raise ValueError("length_scale='learnable' needs a parameter in every attention layer: use "
                         "convert(model, normalizer=..., length_scale='learnable')")
    settings = _settings(normalizer, alpha, length_scale, backend)
    _register(name, _attention_function(settings))
    _REGISTERED.add(name)
    return name


def _register(name: str, function) -> None:
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


_register(FROM_CONFIG, _attention_function(None))


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that call transformers' attention interface: the `...Attention` classes with a
    `config` and a `layer_idx`, as transformers' decoder layers have them."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")
            and hasattr(m, "config") and hasattr(m, "layer_idx")]


def convert(model: PreTrainedModel, *, normalizer: str, alpha: float = 1.5,
            length_scale: float | str | None = None, backend: str = "auto",
            initial_length_scale: float = 1.0) -> PreTrainedModel:
    """Switches `model` (pretrained or not) to longattn's attention, in place, and returns it.

    Args:
        normalizer, alpha, backend: as :func:`longattn.scaled_dot_product_attention`.
        length_scale: None, a float (one ``s`` everywhere), or ``"learnable"``: every attention
            layer gets a parameter ``longattn_length_scale`` of shape ``(Hq,)``, created in float32
            (``model.to(dtype)`` casts it as any parameter), started at `initial_length_scale` (a
            layer that has one already keeps its values).
        initial_length_scale: the learnable ``s`` before training. 1.0 is SSMax's definition; a
            pretrained softmax model is closest to itself at ``1 / ln(n)`` for its usual ``n``.

    Decoder-only language models whose attention goes through transformers'
    ``AttentionInterface``; others are refused with the reason. The settings go into the
    model's config object (``config.longattn``, saved in ``config.json``; a model built from
    the same config object later shares them, as transformers' own implementation choice) and
    its attention implementation becomes ``"longattn_from_config"``, which reads them; the
    learned ``s`` are parameters, saved by ``save_pretrained``. Reload with :func:`from_pretrained`
    (transformers' own loader would drop the ``s``; the model then refuses to run).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel; got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        # transformers would only log that it cannot switch, and the model would run as before
        raise ValueError(f"{type(model).__name__}'s attention does not go through transformers' "
                         "AttentionInterface, so longattn cannot replace it")
    if model.config.sub_configs:
        parts = ", ".join(model.config.sub_configs)
        raise ValueError(
            f"{type(model).__name__} is a composite model (sub-configs {parts}): convert() switches one "
            "language model; register() a name and pass it for the part you want, e.g. "
            "model.set_attn_implementation({'text_config': name})"
        )
    settings = _settings(normalizer, alpha, length_scale, backend)
    if not checks.is_real_number(initial_length_scale):
        raise TypeError("initial_length_scale must be a real number; got "
                        f"{type(initial_length_scale).__name__}")
    if not math.isfinite(initial_length_scale):
        raise ValueError(f"initial_length_scale must be finite; got {initial_length_scale}")
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layers that call transformers' attention "
                         "interface (modules ...Attention with config, layer_idx and head_dim)")
    for layer in layers:
        heads = layer.config.num_attention_heads
        current = getattr(layer, LENGTH_SCALE, None)
        if settings.length_scale != "learnable":
            if current is not None:
                del layer._parameters[LENGTH_SCALE]
        elif current is None or current.shape != (heads,):
            device = next(layer.parameters()).device
            s = torch.full((heads,), float(initial_length_scale), dtype=torch.float32, device=device)
            layer.register_parameter(LENGTH_SCALE, nn.Parameter(s))
    record = {**asdict(settings), "version": __version__}
    # every config a module reads (a multimodal model's text and vision configs are apart)
    configs = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None),
                                                                              PreTrainedConfig)}
    for config in configs.values():
        setattr(config, CONFIG_KEY, record)
    # saved into config.json, so that transformers' loader asks for this implementation again
    model.config.attn_implementation = FROM_CONFIG
    model.set_attn_implementation(FROM_CONFIG)
    return model


def from_pretrained(path: str | os.PathLike, *, model_class=None, backend: str | None = None, **kwargs):
    """Loads a model that :func:`convert` switched and ``save_pretrained`` saved: its normalizer
    settings from ``config.json`` and every learned ``s`` from the checkpoint. `model_class`
    defaults to ``AutoModelForCausalLM``; `backend` replaces the recorded one (a model trained on
    ``"triton"`` can run on ``"torch"``); the other keywords go to the class's ``from_pretrained``.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    with _expecting_length_scales(_model_classes(path, model_class, kwargs)):
        model = model_class.from_pretrained(path, **kwargs)
    record = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds no longattn settings (`{CONFIG_KEY}` in its config.json): it was not "
                         "saved after longattn.integrations.transformers.convert()")
    settings = Settings.from_record(record)
    if backend is not None:
        settings = Settings(settings.normalizer, settings.alpha, settings.length_scale, backend)
    convert(model, **asdict(settings))
    if settings.length_scale == "learnable":
        _load_length_scales(model, path, kwargs)
    return model


def _hub_kwargs(kwargs: dict) -> dict:
    """The keywords of `from_pretrained` that say where its files are."""
    return {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
            if key in kwargs}


def _model_classes(path, model_class, kwargs) -> list[type]:
    """The classes whose `_keys_to_ignore_on_load_unexpected` the load will read: the base, and
    those the checkpoint's architectures (or `model_class`) define it on."""
    import transformers

    config = kwargs.get("config")
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path, **_hub_kwargs(kwargs))
    named = [getattr(transformers, name, None) for name in getattr(config, "architectures", None) or ()]
    classes = {PreTrainedModel}
    for cls in (model_class, *named):
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            classes.update(c for c in cls.__mro__ if "_keys_to_ignore_on_load_unexpected" in vars(c))
    return list(classes)


@contextlib.contextmanager
def _expecting_length_scales(classes: list[type]):
    """transformers' loader knows no `longattn_length_scale` keys: it would report them unexpected
    before `from_pretrained` loads them itself. Its models read the patterns to skip from their
    classes when they are built, so they are added there for the load's duration (process-wide
    while it lasts)."""
    before = {cls: vars(cls)["_keys_to_ignore_on_load_unexpected"] for cls in classes}
    for cls, patterns in before.items():
        cls._keys_to_ignore_on_load_unexpected = [*(patterns or []), rf"\.{LENGTH_SCALE}$"]
    try:
        yield
    finally:
        for cls, patterns in before.items():
            cls._keys_to_ignore_on_load_unexpected = patterns


def _load_length_scales(model: PreTrainedModel, path, kwargs) -> None:
    """Every layer's s from the safetensors checkpoint (one file or an index of shards), in the
    dtype it was saved in."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    wanted = {name: p for name, p in model.named_parameters() if name.endswith(LENGTH_SCALE)}
    hub = _hub_kwargs(kwargs)
    variant = kwargs.get("variant")

    def resolve(name: str):
        if variant is not None:  # transformers' naming: model.safetensors -> model.<variant>.safetensors
            stem, extension = name.rsplit(".", 1)
            name = f"{stem}.{variant}.{extension}"
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)

    index = resolve("model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({file for key, file in weight_map.items() if key.endswith(LENGTH_SCALE)})
        resolved = [cached_file(path, file, _raise_exceptions_for_missing_entries=False, **hub)
                    for file in files]
    else:
        resolved = [resolve("model.safetensors")]
    saved = {}
    for file in filter(None, resolved):
        with safe_open(file, framework="pt") as checkpoint:
            saved.update({key: checkpoint.get_tensor(key) for key in checkpoint.keys()
                          if key.endswith(LENGTH_SCALE)})
    missing = []
    for name, parameter in wanted.items():
        value = saved.get(name, _by_layer(name, saved))
        if value is None:
            missing.append(name)
        else:
            parameter.data = value.to(parameter.device)
    if missing:
        raise ValueError(f"{path} records length_scale='learnable' but its safetensors checkpoint has no "
                         f"{missing[0]} (and {len(missing) - 1} more)")


def _by_layer(name: str, saved: dict):
    """The one saved s whose key ends as `name` does from `layers.` on (a checkpoint may prefix
    its keys differently from the module tree), or None."""
    if "layers." not in name:
        return None
    tail = name[name.index("layers."):]
    matches = [value for key, value in saved.items() if key.endswith("." + tail) or key == tail]
    return matches[0] if len(matches) == 1 else None
