"""The needle study: the probe against its closed form, the task generators, the measured
attention weights, the argument checks, and a tiny end-to-end run of the command."""

import json
import math

import pytest
import torch

import longattn
from longattn.models import TaskConfig, Transformer, TransformerConfig, make_batch, needle, probe
from longattn.models.tasks import IGNORE

# ---------------------------------------------------------------------------------------------
# Probe


@pytest.mark.parametrize("name", list(probe.PROBE_NORMALIZERS))
def test_probe_equals_closed_form(name):
    for n in (2, 3, 10, 316, 10**4, 10**6):
        got, want = probe.max_prob(name, n), probe.closed_form(name, n)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (name, n)


def test_probe_values_by_hand():
    # softmax: 1 / (1 + (n - 1) e^-5), the README's 0.91 at n = 16 and 0.035 at n = 4096
    assert probe.max_prob("softmax", 16) == pytest.approx(1 / (1 + 15 * math.exp(-5)), rel=1e-12)
    assert round(probe.max_prob("softmax", 16), 2) == 0.91
    assert round(probe.max_prob("softmax", 4096), 3) == 0.035
    # SSMax with s = 0.43 rises with n: the gap 5 * 0.43 ln n outgrows ln(n - 1)
    assert probe.max_prob("ssmax", 2) == pytest.approx(1 / (1 + 2 ** (-5 * 0.43)), rel=1e-12)
    assert probe.max_prob("ssmax", 10**6) > 0.9999
    # sparsemax and entmax 1.5: a gap of 5 leaves only the top key (gap >= 1, resp. >= 2)
    assert probe.max_prob("sparsemax", 10**6) == 1.0
    assert probe.max_prob("entmax1.5", 10**6) == 1.0
    # length-scaled entmax at n = 2: the gap 5 * 0.43 ln 2 = 1.49 < 2 keeps both keys
    assert 0.9 < probe.max_prob("entmax1.5+ls", 2) < 1.0


def test_probe_rows_schema():
    rows = probe.run_probe([2, 100])
    assert len(rows) == 2 * len(probe.PROBE_NORMALIZERS)
    assert all({"normalizer", "n", "max_prob"} <= set(r) for r in rows)
    assert probe.default_sizes()[0] == 2 and probe.default_sizes()[-1] == 10**6


# ---------------------------------------------------------------------------------------------
# Tasks


@pytest.mark.parametrize("task", ["passkey", "multikey", "mqar"])
@pytest.mark.parametrize("depth", [None, 0.0, 0.6, 1.0])
def test_generators_deterministic_under_seed(task, depth):
    cfg = TaskConfig(decoy_every=8)
    a = make_batch(task, 3, 96, depth, torch.Generator().manual_seed(7), cfg)
    b = make_batch(task, 3, 96, depth, torch.Generator().manual_seed(7), cfg)
    c = make_batch(task, 3, 96, depth, torch.Generator().manual_seed(8), cfg)
    for field in ("tokens", "targets", "answer_pos", "needle_pos"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("task", ["passkey", "multikey", "mqar"])
@pytest.mark.parametrize("length", [64, 97, 256])
def test_task_structure(task, length):
    """The answer is the value right after the asked key's only key-value occurrence."""
    cfg = TaskConfig(decoy_every=8)
    batch = make_batch(task, 4, length, 0.5, torch.Generator().manual_seed(1), cfg)
    assert batch.tokens.shape == (4, length)
    is_key = (batch.tokens > cfg.n_filler) & (batch.tokens <= cfg.n_filler + cfg.n_keys)
    is_value = batch.tokens > cfg.n_filler + cfg.n_keys
    for b in range(4):
        asked = batch.answer_pos[b]
        assert (batch.targets[b] != IGNORE).sum() == len(asked) == cfg.questions(task)
        for a, needle_at in zip(asked.tolist(), batch.needle_pos[b].tolist()):
            key = batch.tokens[b, a]
            assert batch.tokens[b, a - 1] == cfg.query and batch.tokens[b, needle_at] == key
            assert batch.targets[b, a] == batch.tokens[b, needle_at + 1] and is_value[b, needle_at + 1]
            haystack = batch.tokens[b, : asked[0] - 1]
            followed_by_value = [
                t for t in range(len(haystack) - 1) if haystack[t] == key and is_value[b, t + 1]
            ]
            assert followed_by_value == [needle_at]  # the pair is unique; decoys carry no value
        pairs = int((is_key[b, : asked[0] - 1] & is_value[b, 1 : asked[0]]).sum())
        assert pairs == cfg.pairs(task, length)
    # depth 0.5 puts the needle in the middle of the haystack
    assert abs(batch.needle_pos[0, 0].item() / (batch.answer_pos[0, 0].item() - 1) - 0.5) < 0.1


def test_distractors_and_decoys_grow_with_length():
    cfg = TaskConfig(distractor_every=8, decoy_every=4)
    counts = []
    for length in (64, 512):
        batch = make_batch("multikey", 1, length, 0.3, torch.Generator().manual_seed(0), cfg)
        needle_key = batch.tokens[0, batch.needle_pos[0, 0]]
        counts.append((int((batch.tokens[0] == needle_key).sum()) - 2, cfg.pairs("multikey", length)))
    assert counts == [(64 // 4, 1 + 64 // 8), (512 // 4, 1 + 512 // 8)]  # decoys, pairs
    plain = make_batch("passkey", 1, 512, 0.3, torch.Generator().manual_seed(0), cfg)
    assert int((plain.tokens[0] == plain.tokens[0, plain.needle_pos[0, 0]]).sum()) == 2  # no decoys


@pytest.mark.parametrize("kwargs, name", [
    ({"task": "haystack"}, "task"), ({"length": 5}, "length"), ({"depth": 1.5}, "depth"),
    ({"task": "mqar", "length": 32}, "length"),  # 8 questions leave too few slots for 8 pairs
])
def test_bad_task_arguments(kwargs, name):
    args = {"task": "multikey", "batch": 1, "length": 64, "depth": 0.5, "generator": torch.Generator()}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        make_batch(**args)
    with pytest.raises(ValueError, match="decoy_every"):
        TaskConfig(decoy_every=2)


# ---------------------------------------------------------------------------------------------
# The measured attention


@pytest.mark.parametrize("setting", ["softmax", "ssmax", "sparsemax", "entmax1.3+ls0.4"])
@pytest.mark.parametrize("positional", ["alibi", "partial_rope"])
def test_recorded_weights_are_the_attention_rows(setting, positional):
    """The weights the study records equal the rows of the full attention matrix, which the
    library's reference gives as its output for an identity value."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=30, d_model=32, n_head=4, n_kv_head=2, positional=positional,
                            backend="torch", **needle.parse_setting(setting))
    if cfg.length_scale is None and setting == "ssmax":
        cfg.length_scale = 0.8
    model = Transformer(cfg).double().eval()
    attn = model.blocks[1].attn
    captured = {}
    forward = attn.attend.forward

    def capture(q, k, v, mask=None, *args, **kwargs):
        captured.update(q=q, k=k, mask=mask, kwargs=kwargs)
        return forward(q, k, v, mask, *args, **kwargs)

    attn.attend.forward = capture
    idx = torch.randint(0, 30, (2, 21))
    logits, weights = model(idx, attention_rows=[5, 20])
    torch.testing.assert_close(logits, model(idx))  # recording changes nothing else
    q, k = captured["q"], captured["k"]
    eye = torch.eye(k.shape[2], dtype=q.dtype).expand(k.shape[0], k.shape[1], -1, -1)
    full = longattn.scaled_dot_product_attention(
        q, k, eye, captured["mask"], normalizer=cfg.normalizer, alpha=cfg.alpha,
        length_scale=attn.attend.length_scale, backend="reference", **captured["kwargs"],
    )
    assert len(weights) == 2 and weights[1].shape == (2, 4, 2, 21)
    torch.testing.assert_close(weights[1].double(), full[:, :, [5, 20]], rtol=1e-5, atol=1e-6)


def test_evaluate_cell_measures():
    cfg = needle.StudyConfig(settings=("softmax",), samples=3)
    torch.manual_seed(0)
    model = Transformer(cfg.model_config("softmax"))
    generator = torch.Generator().manual_seed(0)
    cell = needle.evaluate_cell(model, "multikey", 128, 0.5, 3, generator, cfg.task_config)
    assert 0.0 <= cell["accuracy"] <= 1.0
    assert len(cell["needle_attention"]) == len(cell["entropy"]) == cfg.n_layer
    assert all(0.0 <= a <= 1.0 for a in cell["needle_attention"])
    assert all(0.0 <= e <= math.log(128) + 1e-6 for e in cell["entropy"])
    assert torch.is_tensor(model(torch.zeros(1, 4, dtype=torch.long)))  # the model kept no recording state


# ---------------------------------------------------------------------------------------------
# Settings, config and command line


def test_parse_setting():
    assert needle.parse_setting("softmax") == {"normalizer": "softmax", "alpha": 1.5}
    want = {"normalizer": "entmax", "alpha": 1.3, "length_scale": 0.5}
    assert needle.parse_setting("entmax1.3+ls0.5") == want
    assert needle.parse_setting("ssmax")["length_scale"] is None  # the study's default start
    cfg = needle.StudyConfig(train_length=64)
    assert cfg.model_config("entmax1.5+ls").length_scale == pytest.approx(1 / math.log(64))
    for bad in ("softmax2", "ssmax+ls", "entmax3", "relu", ""):
        with pytest.raises(ValueError, match="setting"):
            needle.parse_setting(bad)


@pytest.mark.parametrize("kwargs, name", [
    ({"settings": ("softmax", "softmax")}, "settings"), ({"task": "essay"}, "task"),
    ({"positional": "learned"}, "positional"), ({"steps": 0}, "steps"), ({"max_factor": 3}, "max_factor"),
    ({"depths": (1.2,)}, "depths"), ({"lr": 2.0}, "lr"), ({"workers": 0}, "workers"),
])
def test_bad_study_config_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        needle.StudyConfig(**kwargs)


def test_cli_bad_argument_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="max_factor"):
        needle.main(["--out", str(tmp_path), "--max-factor", "6"])
    with pytest.raises(ValueError, match="setting"):
        needle.main(["--out", str(tmp_path), "--settings", "softmax9"])


def test_command_end_to_end(tmp_path):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--settings", "softmax", "entmax1.5+ls", "--steps", "3", "--batch-size", "4",
            "--max-factor", "2", "--depths", "0", "1", "--samples", "2", "--workers", "1"]
    needle.main(argv)
    for name in ("results.json", "run.json", "report.md", "heatmaps.png", "fading.png", "probe.png"):
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "results.json").read_text())
    study = [r for r in rows if r["kind"] == "study"]
    probe_rows = [r for r in rows if r["kind"] == "probe"]
    assert {tuple(sorted(r)) for r in probe_rows} == {("closed_form", "kind", "max_prob", "n", "normalizer")}
    required = {"setting", "train_length", "length", "depth", "accuracy", "needle_attention", "entropy"}
    assert all(required <= set(r) for r in study)
    grid = {(r["setting"], r["length"], r["depth"]) for r in study if r["task"] == "multikey"}
    assert grid == {(s, n, d) for s in ("softmax", "entmax1.5+ls") for n in (64, 128) for d in (0.0, 1.0)}
    assert {r["task"] for r in study} == {"multikey", "passkey"}
    assert all(len(r["needle_attention"]) == 2 and r["train_length"] == 64 for r in study)
    report = (out / "report.md").read_text()
    assert "| entmax1.5+ls |" in report and "Probe" in report
    # seeded: a second run writes the same results
    needle.main(argv[:1] + [str(tmp_path / "again")] + argv[2:])
    assert json.loads((tmp_path / "again" / "results.json").read_text()) == rows


def test_module_command_with_two_workers_matches_one(tmp_path):
    """`python -m longattn.models.needle` runs the settings in worker processes; each seeds
    itself, so the rows equal those of a run in this process."""
    import subprocess
    import sys

    argv = ["--settings", "softmax", "sparsemax", "--steps", "2", "--batch-size", "2", "--max-factor", "1",
            "--depths", "0.5", "--samples", "2", "--no-probe"]
    done = subprocess.run([sys.executable, "-m", "longattn.models.needle", "--out", str(tmp_path / "two"),
                           "--workers", "2", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    needle.main(["--out", str(tmp_path / "one"), "--workers", "1", *argv])
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert len(one) == 4 and two == one  # 2 settings x (multikey, passkey) x 1 length x 1 depth
