"""The needle-in-a-haystack study of attention fading: `longattn-needle` (or
`python -m longattn.models.needle`).

For each attention setting it trains one small reference Transformer on CPU at a short length,
then evaluates it on a grid of context length x needle depth, up to 32 times the training
length. Per cell it measures the answer accuracy, the attention weight the answer position
puts on the needle (the largest over heads, per layer) and that head's attention entropy. A
probe with no training adds the closed-form picture. Results go to `DIR/results.json`,
`DIR/report.md` and PNG figures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longattn.attention import checks, normalizers

from . import probe
from .tasks import IGNORE, TASKS, TaskConfig, check_task, make_batch
from .transformer import POSITIONAL, Transformer, TransformerConfig

DEFAULT_SETTINGS = ("softmax", "ssmax", "sparsemax", "entmax1.5", "entmax1.5+ls")


def parse_setting(spec: str) -> dict:
    """A setting name -> the attention fields of `TransformerConfig`.

    `<normalizer>[<alpha>|-learn][+ls[<s>]]`, the normalizer any registered name: "softmax",
    "ssmax", "sparsemax", "entmax1.5", "entmax1.3+ls" (length-scaled, learnable s starting where
    `StudyConfig.model_config` puts it), "sparsemax+ls0.5" (s starting at 0.5), "entmax-learn"
    (alpha learned per head from 1.5, Correia et al. 2019), "entmax-learn+ls".
    """
    names = "|".join(sorted(map(re.escape, normalizers.names()), key=len, reverse=True))
    pattern = rf"^({names})(\d*\.?\d+|-learn)?(\+ls(\d*\.?\d+)?)?$"
    m = re.match(pattern, spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"setting must look like softmax, ssmax, sparsemax, entmax1.5, entmax-learn or "
                         f"entmax1.5+ls0.5; got {spec!r}")
    normalizer, alpha, ls, s = m.groups()
    record = normalizers.get(normalizer)
    if alpha is not None and not record.takes_alpha:
        raise ValueError(f"setting {spec!r}: {normalizer} takes no alpha")
    if ls is not None and record.length_scaled:
        raise ValueError(f"setting {spec!r}: {normalizer} is length-scaled already; write {normalizer}")
    learn = alpha == "-learn"
    attention = {"normalizer": normalizer, "alpha": "learnable" if learn else float(alpha) if alpha else 1.5}
    try:
        if not learn:
            checks.check_alpha(attention["alpha"])
    except ValueError as error:
        raise ValueError(f"setting {spec!r}: {error}") from None
    if ls is not None or record.length_scaled:
        attention["length_scale"] = float(s) if s else None  # None: the study's default start
    return attention


@dataclass
class StudyConfig:
    settings: tuple[str, ...] = DEFAULT_SETTINGS
    task: str = "multikey"                  # the task of the main grid (length x depth)
    train_task: str = "mqar"                # what the models train on: 8 questions a sequence
                                            # teach the look-up several times faster than one
    extra_tasks: tuple[str, ...] = ("passkey",)  # also evaluated (same models), at depth 0.5
    positional: str = "nope"                # token shift carries the previous token, so no head
                                            # needs positions: length effects are the normalizer's
    train_length: int = 64
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    token_shift: bool = True
    max_factor: int = 32                    # lengths train_length * 2^k up to this factor
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 32                       # sequences per (length, depth) cell
    seed: int = 0
    workers: int = 2                        # settings trained at once, one thread each
    task_config: TaskConfig = field(default_factory=lambda: TaskConfig(decoy_every=5))

    def __post_init__(self):
        if isinstance(self.settings, str) or not self.settings:
            raise ValueError(f"settings must be a non-empty list of names; got {self.settings!r}")
        for spec in self.settings:
            parse_setting(spec)
        if len(set(self.settings)) != len(self.settings):
            raise ValueError(f"settings must not repeat; got {list(self.settings)}")
        for name in ("task", "train_task"):
            if getattr(self, name) not in TASKS:
                raise ValueError(f"{name} must be one of {', '.join(TASKS)}; got {getattr(self, name)!r}")
        for t in self.extra_tasks:
            if t not in TASKS:
                raise ValueError(f"extra_tasks must be among {', '.join(TASKS)}; got {t!r}")
        if self.positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {', '.join(POSITIONAL)}; got {self.positional!r}")
        for name in ("train_length", "steps", "batch_size", "max_factor", "samples", "d_model", "n_layer",
                     "n_head", "n_kv_head", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not (isinstance(self.lr, float) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a float in (0, 1); got {self.lr!r}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be a non-empty list in [0, 1]; got {self.depths!r}")
        if self.max_factor & (self.max_factor - 1):
            raise ValueError(f"max_factor must be a power of two; got {self.max_factor}")
        for task in (self.task, self.train_task, *self.extra_tasks):  # the longest must be valid
            check_task(task, self.train_length, 0.5, self.task_config)
            check_task(task, self.train_length * self.max_factor, 0.5, self.task_config)

    @property
    def lengths(self) -> list[int]:
        return [self.train_length * 2**k for k in range(int(math.log2(self.max_factor)) + 1)]

    def model_config(self, setting: str) -> TransformerConfig:
        attention = parse_setting(setting)
        if "length_scale" in attention and attention["length_scale"] is None:
            # s starts at 1 / ln(train_length): at the training length the logits start as the
            # unscaled ones, so every setting starts training from the same attention sharpness
            attention["length_scale"] = 1.0 / math.log(self.train_length)
        return TransformerConfig(
            vocab_size=self.task_config.vocab_size, d_model=self.d_model, n_layer=self.n_layer,
            n_head=self.n_head, n_kv_head=self.n_kv_head, positional=self.positional,
            token_shift=self.token_shift, **attention,
        )


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def train(model: Transformer, cfg: StudyConfig, seed: int, desc: str = "", position: int = 0,
          context_parallel=None) -> list[float]:
    """AdamW on the loss at the answer positions only (the filler is unpredictable noise), with
    linear warm-up and cosine decay. Returns the loss of every step.

    With `context_parallel` (a `longattn.distributed.ContextParallel`; every rank runs this with
    the same model and seed), each rank computes its shard of the sequence and its share of the
    loss, and the gradients are summed over the group before each step, so every rank takes the
    step one process would."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.steps // 20)

    def lr_factor(i):
        return min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc=f"train {desc}", leave=False, mininterval=1.0, position=position)
    for _ in bar:
        batch = make_batch(cfg.train_task, cfg.batch_size, cfg.train_length, None, generator, cfg.task_config)
        opt.zero_grad(set_to_none=True)
        if context_parallel is None:
            logits = model(batch.tokens)
            loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
            loss.backward()
        else:
            loss = _context_parallel_step(model, batch, context_parallel)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return losses


def _context_parallel_step(model: Transformer, batch, cp) -> torch.Tensor:
    """The backward of one batch run context-parallel: this rank's share of the mean loss (its
    answer positions' summed loss over every rank's count), then the gradients summed over the
    group. Returns the whole batch's loss."""
    import torch.distributed as dist

    targets = cp.shard(batch.targets, dim=1)
    logits = model(batch.tokens, context_parallel=cp)
    count = (batch.targets != IGNORE).sum()  # the whole sequence's, known to every rank
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum") / count
    loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=cp.group)
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp.group)
    return total


@torch.no_grad()
def evaluate_cell(model: Transformer, task: str, length: int, depth: float, samples: int,
                  generator: torch.Generator, task_config: TaskConfig) -> dict:
    """Accuracy, needle attention and entropy at the answer positions of `samples` sequences.

    Needle attention: the weight the answer row puts on the needle pair (its key and value
    tokens together, since a look-up head may land on either), the largest over heads, one
    number per layer. Entropy: that same head's row entropy, in nats. Both averaged over
    sequences and questions.
    """
    model.eval()
    batch = make_batch(task, samples, length, depth, generator, task_config)
    rows = batch.answer_pos[0].tolist()  # the questions sit at the same places in every sequence
    logits, weights = model(batch.tokens, attention_rows=rows)  # weights: per layer (B, H, Q, N)
    predicted = logits[:, rows].argmax(-1)  # (B, Q)
    answers = batch.targets[torch.arange(samples)[:, None], batch.answer_pos]
    needle_attention, entropy = [], []
    for w in weights:
        key_at = batch.needle_pos[:, None, :, None].expand(-1, w.shape[1], -1, 1)  # (B, H, Q, 1)
        on_needle = (w.gather(-1, key_at) + w.gather(-1, key_at + 1)).squeeze(-1)  # key + value, (B, H, Q)
        best, head = on_needle.max(dim=1)  # (B, Q)
        ent = -(w * torch.log(w.clamp(min=1e-30))).sum(-1)  # (B, H, Q)
        ent_best = ent.gather(1, head[:, None, :]).squeeze(1)
        needle_attention.append(best.mean().item())
        entropy.append(ent_best.mean().item())
    return {
        "accuracy": (predicted == answers).float().mean().item(),
        "needle_attention": needle_attention,
        "entropy": entropy,
    }


def evaluate(model, cfg: StudyConfig, setting: str, task: str, depths, seed: int,
             position: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    cells = [(n, d) for n in cfg.lengths for d in depths]
    for length, depth in tqdm(cells, desc=f"eval {setting} {task}", leave=False, position=position):
        cell = evaluate_cell(model, task, length, depth, cfg.samples, generator, cfg.task_config)
        rows.append({
            "kind": "study", "setting": setting, "task": task, "positional": cfg.positional,
            "train_length": cfg.train_length, "length": length, "depth": depth, **cell,
        })
    return rows


def run_setting(cfg: StudyConfig, setting: str, out: Path | None, save_models: bool, slot: int = 0):
    """Trains and evaluates one setting, on one thread; returns (rows, training summary)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread each, settings side by side, is faster
    try:
        torch.manual_seed(cfg.seed)  # every setting starts from the same weights where shapes agree
        model = Transformer(cfg.model_config(setting))
        t0 = time.perf_counter()
        losses = train(model, cfg, seed=cfg.seed + 1, desc=setting, position=slot)
        train_s = time.perf_counter() - t0
        if save_models and out is not None:
            model.save(out / f"model_{setting}.pt")
        t0 = time.perf_counter()
        rows = evaluate(model, cfg, setting, cfg.task, cfg.depths, seed=cfg.seed + 2, position=slot)
        for extra in cfg.extra_tasks:
            if extra != cfg.task:
                rows += evaluate(model, cfg, setting, extra, (0.5,), seed=cfg.seed + 3, position=slot)
    finally:
        torch.set_num_threads(threads)
    scales = [b.attn.attend.length_scale for b in model.blocks]
    alphas = [b.attn.attend.alpha for b in model.blocks]
    summary = {
        "setting": setting, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t0, 1),
        "length_scale": None if scales[0] is None else [
            [round(x, 3) for x in torch.as_tensor(s).flatten().tolist()] for s in scales
        ],
    }
    if torch.is_tensor(alphas[0]):  # learned: each head's
        summary["alpha"] = [[round(x, 3) for x in a.detach().flatten().tolist()] for a in alphas]
    return rows, summary


def run_study(cfg: StudyConfig, out: Path | None = None, save_models: bool = False) -> dict:
    """Trains and evaluates every setting, `cfg.workers` at a time; returns `{"rows", "train"}`.
    Each setting seeds itself, so the results do not depend on the number of workers."""
    results = {}
    if cfg.workers == 1 or len(cfg.settings) == 1:
        for setting in cfg.settings:
            results[setting] = run_setting(cfg, setting, out, save_models)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread state
        with ProcessPoolExecutor(min(cfg.workers, len(cfg.settings)), mp_context=ctx) as pool:
            futures = {
                pool.submit(run_setting, cfg, s, out, save_models, 1 + i % cfg.workers): s
                for i, s in enumerate(cfg.settings)
            }
            for done in tqdm(as_completed(futures), total=len(futures), desc="settings"):
                results[futures[done]] = done.result()
    rows = [r for s in cfg.settings for r in results[s][0]]
    return {"rows": rows, "train": [results[s][1] for s in cfg.settings]}


# ---------------------------------------------------------------------------------------------
# Outputs: results.json, report.md, figures


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def cell_value(row: dict, key: str) -> float:
    """One number per cell: the accuracy; the needle attention of the layer that attends most to
    the needle (the look-up layer); that layer's entropy."""
    if key == "accuracy":
        return row["accuracy"]
    layer = max(range(len(row["needle_attention"])), key=lambda i: row["needle_attention"][i])
    return row[key][layer]


def by_length(rows, setting, task, key) -> dict:
    """{length: mean over depths of `cell_value`}."""
    table = {}
    for r in rows:
        if r["setting"] == setting and r["task"] == task:
            table.setdefault(r["length"], []).append(cell_value(r, key))
    return {n: mean(vs) for n, vs in sorted(table.items())}


TITLES = {
    "accuracy": "Accuracy",
    "needle_attention": "Needle attention (largest over heads, in the layer that attends most to it)",
    "entropy": "Entropy (nats) of that head's row",
}


def write_report(result: dict, cfg: StudyConfig, out: Path, wall_s: float, command: str) -> None:
    study = [r for r in result["rows"] if r.get("kind") == "study"]
    probe_rows = [r for r in result["rows"] if r.get("kind") == "probe"]
    tasks = [cfg.task] + [t for t in cfg.extra_tasks if t != cfg.task]
    tc = cfg.task_config
    lines = [
        "# Needle-in-a-haystack study", "",
        f"Command: `{command}`; {wall_s:.0f} s wall time. Models: {cfg.n_layer} layers, d_model "
        f"{cfg.d_model}, {cfg.n_head} query / {cfg.n_kv_head} key-value heads, {cfg.positional}, token shift "
        f"{'on' if cfg.token_shift else 'off'}; trained {cfg.steps} steps x {cfg.batch_size} sequences on "
        f"`{cfg.train_task}` at length {cfg.train_length}; evaluated on `{cfg.task}` (one decoy per "
        f"{tc.decoy_every or 'none'} tokens, one distractor pair per {tc.distractor_every} tokens, "
        f"{tc.n_keys} keys) and on {', '.join(f'`{t}`' for t in tasks[1:]) or 'nothing else'}; "
        f"{cfg.samples} samples per cell; seed {cfg.seed}.", "",
    ]
    header = "| setting | " + " | ".join(str(n) for n in cfg.lengths) + " |"
    rule = "|---|" + "---|" * len(cfg.lengths)
    for task in tasks:
        for key, title in TITLES.items():
            lines += [f"## {title}, `{task}`, mean over depths, by length", "", header, rule]
            for s in cfg.settings:
                vals = by_length(study, s, task, key)
                lines.append(f"| {s} | " + " | ".join(f"{vals[n]:.2f}" for n in cfg.lengths) + " |")
            lines.append("")
    if probe_rows:
        decades = (2, 10, 100, 10**3, 10**4, 10**5, 10**6)
        shown = [n for n in sorted({r["n"] for r in probe_rows}) if n in decades]
        lines += ["## Probe: one logit +3 among n - 1 logits -2, the largest weight", "",
                  "| normalizer | " + " | ".join(f"n={n:g}" for n in shown) + " |",
                  "|---|" + "---|" * len(shown)]
        for name in dict.fromkeys(r["normalizer"] for r in probe_rows):
            vals = {r["n"]: r["max_prob"] for r in probe_rows if r["normalizer"] == name}
            lines.append(f"| {name} | " + " | ".join(f"{vals[n]:.4f}" for n in shown) + " |")
        lines.append("")
    lines += ["## Training", "",
              "| setting | final loss | train s | eval s | learned s (per layer, per head) | learned alpha |",
              "|---|---|---|---|---|---|"]
    for t in result["train"]:
        lines.append(f"| {t['setting']} | {t['final_loss']:.3f} | {t['train_s']} | {t['eval_s']} | "
                     f"{t['length_scale'] or ''} | {t.get('alpha') or ''} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot(result: dict, cfg: StudyConfig, out: Path) -> list[str]:
    """Accuracy heatmaps (length x depth) per setting, fading curves, the probe. Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the study's figures need matplotlib: pip install 'longattn[test]'") from e
    study = [r for r in result["rows"] if r.get("kind") == "study" and r["task"] == cfg.task]
    written = []
    n_set = len(cfg.settings)
    fig, axes = plt.subplots(1, n_set, figsize=(3.2 * n_set, 3.4), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], cfg.settings):
        grid = torch.full((len(cfg.depths), len(cfg.lengths)), float("nan"))
        for r in study:
            if r["setting"] == s:
                grid[cfg.depths.index(r["depth"]), cfg.lengths.index(r["length"])] = r["accuracy"]
        im = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(cfg.lengths)), [str(n) for n in cfg.lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(cfg.depths)), [f"{d:.0%}" for d in cfg.depths], fontsize=7)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("context length", fontsize=8)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"Answer accuracy, {cfg.task}, trained at {cfg.train_length}", fontsize=10, y=1.04)
    fig.savefig(out / "heatmaps.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append("heatmaps.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for s in cfg.settings:
        att = by_length(study, s, cfg.task, "needle_attention")
        acc = by_length(study, s, cfg.task, "accuracy")
        ax1.plot(list(att), list(att.values()), marker="o", label=s)
        ax2.plot(list(acc), list(acc.values()), marker="o", label=s)
    for ax, label in ((ax1, "attention on the needle"), (ax2, "accuracy")):
        ax.set_xscale("log", base=2)
        ax.axvline(cfg.train_length, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"Fading: {cfg.task}, mean over depths; dashed line: training length", fontsize=10)
    fig.savefig(out / "fading.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append("fading.png")

    probe_rows = [r for r in result["rows"] if r.get("kind") == "probe"]
    if probe_rows:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name in dict.fromkeys(r["normalizer"] for r in probe_rows):
            pts = [(r["n"], r["max_prob"]) for r in probe_rows if r["normalizer"] == name]
            ax.plot(*zip(*pts), marker=".", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("n (keys)")
        ax.set_ylabel("largest weight")
        ax.set_title("Probe: +3 among n - 1 logits of -2 (s = 0.43)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(out / "probe.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append("probe.png")
    return written


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(
        prog="longattn-needle",
        description="Train small Transformers with different attention normalizers and measure attention "
                    "fading on needle-in-a-haystack tasks. With no options (or --quick) it runs the default "
                    "study: five settings, about five minutes on two CPU cores.",
    )
    p.add_argument("--quick", action="store_true", help="the default study (the defaults below)")
    p.add_argument("--out", default="needle_results", help="output folder (default: needle_results)")
    p.add_argument("--settings", nargs="+", default=list(d.settings),
                   help="attention settings: softmax, ssmax, sparsemax, entmax<alpha>, entmax-learn (alpha "
                        "learned per head), any with +ls[<s>] for length scaling, e.g. entmax1.3+ls "
                        "sparsemax+ls0.5 entmax-learn+ls")
    p.add_argument("--task", default=d.task, choices=TASKS, help="task of the length x depth grid")
    p.add_argument("--train-task", default=d.train_task, choices=TASKS)
    p.add_argument("--extra-tasks", nargs="*", default=list(d.extra_tasks), choices=TASKS,
                   help="also evaluated, at depth 0.5")
    p.add_argument("--positional", default=d.positional, choices=POSITIONAL)
    p.add_argument("--no-token-shift", action="store_true", help="no token shift (models learn far slower)")
    p.add_argument("--train-length", type=int, default=d.train_length)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.n_layer)
    p.add_argument("--heads", type=int, default=d.n_head)
    p.add_argument("--kv-heads", type=int, default=d.n_kv_head)
    p.add_argument("--max-factor", type=int, default=d.max_factor,
                   help="evaluate at train_length * 2^k up to this factor (a power of two)")
    p.add_argument("--depths", type=float, nargs="+", default=list(d.depths))
    p.add_argument("--samples", type=int, default=d.samples, help="sequences per (length, depth) cell")
    p.add_argument("--n-keys", type=int, default=d.task_config.n_keys,
                   help="key tokens (distractor keys repeat; asked keys are unique in their sequence)")
    p.add_argument("--distractor-every", type=int, default=d.task_config.distractor_every,
                   help="multikey: one distractor pair per this many tokens")
    p.add_argument("--decoy-every", type=int, default=d.task_config.decoy_every,
                   help="multikey, mqar: a decoy (the needle's key, no value) per this many tokens (0: none)")
    p.add_argument("--workers", type=int, default=d.workers, help="settings trained at once, one thread each")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-probe", action="store_true", help="skip the probe")
    p.add_argument("--save-models", action="store_true", help="save the models to DIR/model_<setting>.pt")
    return p


def config_from_args(args) -> StudyConfig:
    return StudyConfig(
        settings=tuple(args.settings), task=args.task, train_task=args.train_task,
        extra_tasks=tuple(args.extra_tasks), positional=args.positional, token_shift=not args.no_token_shift,
        train_length=args.train_length, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        d_model=args.d_model, n_layer=args.layers, n_head=args.heads, n_kv_head=args.kv_heads,
        max_factor=args.max_factor, depths=tuple(args.depths), samples=args.samples, workers=args.workers,
        seed=args.seed,
        task_config=TaskConfig(n_keys=args.n_keys, distractor_every=args.distractor_every,
                               decoy_every=args.decoy_every),
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "longattn-needle " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    t0 = time.perf_counter()
    result = run_study(cfg, out, save_models=args.save_models)
    if not args.no_probe:
        result["rows"] += [{"kind": "probe", **r} for r in probe.run_probe()]
    wall_s = time.perf_counter() - t0
    config = asdict(cfg)
    (out / "results.json").write_text(json.dumps(result["rows"], indent=1) + "\n")
    (out / "run.json").write_text(json.dumps(
        {"command": command.strip(), "wall_s": round(wall_s, 1), "config": config, "train": result["train"]},
        indent=1,
    ) + "\n")
    write_report(result, cfg, out, wall_s, command.strip())
    plot(result, cfg, out)
    print(f"wrote {out}/results.json, report.md and figures in {wall_s:.0f} s")


if __name__ == "__main__":
    main()
