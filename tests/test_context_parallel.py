"""Context parallelism (`longattn.distributed`) on real `torch.distributed` processes: gloo on
CPU, 2 and 4 spawned ranks. Each mode, layout and normalizer against the single-process call on
the whole sequence, which every rank also runs: the output and every gradient (q, k, v, and a
tensor length scale, whose per-rank shares are summed), causal and not, GQA; a group of one;
and the errors, raised alike on every rank.

Spawning costs seconds, so each world size is spawned once (`ranks2`, `ranks4`): every rank runs
all the cases and saves what it measured, and each test reads its case back.
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import longattn
from longattn.distributed import (
    MODES,
    ContextParallel,
    context_parallel_attention,
    gather_sequence,
    shard_sequence,
)
from longattn.distributed.ring import torch_block_bwd, torch_block_fwd
from longattn.models.needle import StudyConfig, train
from longattn.models.tasks import IGNORE
from longattn.models.transformer import Transformer, TransformerConfig

from conftest import INTERPRET
from oracles import rel_err

# (mode, layout, normalizer, alpha, causal, GQA): every mode and layout with each normalizer,
# causal and not, GQA on for half of them
NORMALIZERS = [("softmax", 1.5), ("ssmax", 1.5), ("sparsemax", 2.0), ("entmax", 1.5)]
CASES = {
    f"{mode}-{layout}-{name}-{'causal' if causal else 'full'}{'-gqa' if gqa else ''}":
        dict(mode=mode, layout=layout, normalizer=name, alpha=alpha, is_causal=causal, gqa=gqa)
    for mode in ("allgather", "ulysses") for layout in ("contiguous", "zigzag")
    for i, (name, alpha) in enumerate(NORMALIZERS) for causal in (True, False)
    for gqa in [(i + causal) % 2 == 0]
}
CASES.update({  # the ring: softmax's family only
    f"ring-{layout}-{name}-{'causal' if causal else 'full'}{'-gqa' if causal else ''}":
        dict(mode="ring", layout=layout, normalizer=name, is_causal=causal, gqa=causal)
    for layout in ("contiguous", "zigzag") for name in ("softmax", "ssmax") for causal in (True, False)
})
CASES.update({
    # shifted causal masks, counted from the start of the whole sequence, and fewer queries than keys
    "allgather-zigzag-entmax-offset-3": dict(mode="allgather", layout="zigzag", normalizer="entmax",
                                             alpha=1.25, causal_offset=-3, gqa=True),
    "ulysses-zigzag-ssmax-offset5": dict(mode="ulysses", layout="zigzag", normalizer="ssmax",
                                         causal_offset=5),
    "allgather-contiguous-ssmax-bottom-right": dict(mode="allgather", layout="contiguous", normalizer="ssmax",
                                                    causal_offset="bottom_right", queries_per_key=0.5),
    "ulysses-contiguous-sparsemax-bottom-right": dict(mode="ulysses", layout="contiguous",
                                                      normalizer="sparsemax", causal_offset="bottom_right",
                                                      queries_per_key=0.5, gqa=True),
    "ring-zigzag-ssmax-offset-4": dict(mode="ring", layout="zigzag", normalizer="ssmax", causal_offset=-4),
    "ring-contiguous-softmax-bottom-right": dict(mode="ring", layout="contiguous", normalizer="softmax",
                                                 causal_offset="bottom_right", queries_per_key=0.5, gqa=True),
    "default-mode-entmax": dict(mode=None, layout="zigzag", normalizer="entmax", is_causal=True),
    # one alpha per head, with its gradient: Ulysses hands each rank its heads' alphas
    "ulysses-zigzag-entmax-causal-head-alpha": dict(mode="ulysses", layout="zigzag", normalizer="entmax",
                                                    is_causal=True, gqa=True, head_alpha=True),
    "allgather-contiguous-entmax-full-head-alpha": dict(mode="allgather", layout="contiguous",
                                                        normalizer="entmax", head_alpha=True),
})
if INTERPRET:  # the Triton kernels in the interpreter, float32, against the same kernels on one process
    CASES.update({
        "triton-allgather-zigzag-entmax-causal": dict(mode="allgather", layout="zigzag", normalizer="entmax",
                                                      is_causal=True, gqa=True, backend="triton"),
        "triton-ulysses-contiguous-ssmax-causal": dict(mode="ulysses", layout="contiguous",
                                                       normalizer="ssmax", is_causal=True, backend="triton"),
        "triton-ring-zigzag-ssmax-causal": dict(mode="ring", layout="zigzag", normalizer="ssmax",
                                                is_causal=True, gqa=True, backend="triton"),
        # 16 bits: each block's partial output is rounded before the merge, a few roundings a row
        "triton-ring-zigzag-softmax-causal-fp16": dict(mode="ring", layout="zigzag", normalizer="softmax",
                                                       is_causal=True, backend="triton", dtype="float16",
                                                       tolerance=1e-3),
    })
# On 4 ranks: both modes at their hardest (zigzag, causal, length-scaled), and Ulysses with one
# key head for the 4 ranks (each reads the same one)
CASES_4 = {
    name: case for name, case in CASES.items()
    if case["layout"] == "zigzag" and case.get("is_causal") and case["normalizer"] in ("ssmax", "entmax")
    and "backend" not in case
}
CASES_4["ulysses-contiguous-entmax-causal-mqa"] = dict(mode="ulysses", layout="contiguous",
                                                      normalizer="entmax", is_causal=True, kv_heads=1)

# (what, the ValueError's words): bad calls, made alike on every rank
ERRORS = {
    "unequal-shards": "every rank's shards must have the same shapes; rank",
    "ulysses-heads": "to divide the query heads, 3",
    "ulysses-split-group": "would split a group of 2 heads",
    "odd-zigzag": "layout='zigzag' needs shards of even length",
    "bad-layout": "layout must be one of",
    "bad-mode": "mode must be None or one of",
    "ring-entmax": "mode='ring' serves softmax and SSMax, whose partial rows merge through their "
                   "log-sum-exp; normalizer='entmax'",
    "ring-reference": "mode='ring' computes its blocks on backend 'torch' or 'triton'",
    # bad on one rank only: the shapes are compared first, so every rank raises, none hangs
    "one-rank-odd-zigzag": "every rank's shards must have the same shapes; rank",
    "one-rank-heads": "every rank's shards must have the same shapes; rank",
}


def _tensors(world, case, dtype):
    """The whole sequence's q, k, v, length scale and upstream gradient, the same on every rank."""
    torch.manual_seed(0)
    n_k = 6 * world  # zigzag chunks of 3
    n_q = int(n_k * case.get("queries_per_key", 1))
    h_kv = case.get("kv_heads", 2 if case.get("gqa") else 4)
    q = torch.randn(2, 4, n_q, 8, dtype=dtype)
    k, v = torch.randn(2, h_kv, n_k, 8, dtype=dtype), torch.randn(2, h_kv, n_k, 6, dtype=dtype)
    s = 0.5 + torch.rand(4, dtype=dtype)
    return q, k, v, s, torch.randn(2, 4, n_q, 6, dtype=dtype)


def _run_case(world, case):
    """Relative errors of this rank's output and gradients against the single-process call."""
    dtype = getattr(torch, case.get("dtype", "float32" if case.get("backend") == "triton" else "float64"))
    q, k, v, s, do = _tensors(world, case, dtype)
    scaled = case["normalizer"] in ("ssmax", "entmax")
    alpha = torch.tensor([1.2, 1.5, 1.8, 2.0], dtype=dtype) if case.get("head_alpha") else None
    kwargs = dict(is_causal=case.get("is_causal", False), causal_offset=case.get("causal_offset"),
                  enable_gqa=q.shape[1] != k.shape[1], normalizer=case["normalizer"],
                  backend=case.get("backend", "auto"))
    # the per-head tensors whose gradients each rank holds a share of: s and a tensor alpha
    shared = {"ds": ("length_scale", s) if scaled else None, "dalpha": ("alpha", alpha) if alpha is not None
              else None}
    shared = {name: pair for name, pair in shared.items() if pair is not None}
    if alpha is None:
        kwargs["alpha"] = case.get("alpha", 1.5)

    def leaves():
        return {arg: t.clone().requires_grad_() for arg, t in shared.values()}

    full, full_shared = [t.clone().requires_grad_() for t in (q, k, v)], leaves()
    out_full = longattn.scaled_dot_product_attention(*full, **full_shared, **kwargs)
    want = torch.autograd.grad(out_full, [*full, *full_shared.values()], do)

    layout = case["layout"]
    mine = [shard_sequence(t, layout=layout).detach().requires_grad_() for t in (q, k, v)]
    mine_shared = leaves()
    out = context_parallel_attention(*mine, mode=case["mode"], layout=layout, **mine_shared, **kwargs)
    got = list(torch.autograd.grad(out, [*mine, *mine_shared.values()], shard_sequence(do, layout=layout)))
    errors = {"out": rel_err(out, shard_sequence(out_full, layout=layout))}
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        errors[name] = rel_err(g, shard_sequence(w, layout=layout))
    for name, g, w in zip(shared, got[3:], want[3:]):  # this rank's share; the shares sum to the whole's
        dist.all_reduce(g)
        errors[name] = rel_err(g, w)
    return errors


def _run_error(world, rank, what):
    """The ValueError's message of bad call `what`, or what happened instead."""
    q, k, v, _, _ = _tensors(world, {}, torch.float64)
    q, k, v = (shard_sequence(t) for t in (q, k, v))
    call = {
        "unequal-shards": lambda: context_parallel_attention(q[..., :6 - 2 * rank, :], k, v),
        "ulysses-heads": lambda: context_parallel_attention(q[:, :3], k[:, :3], v[:, :3], mode="ulysses"),
        # 6 query heads over 3 key heads: 3 heads a rank (world 2) split a group of 2
        "ulysses-split-group": lambda: context_parallel_attention(q[:, :3].repeat(1, 2, 1, 1), k[:, :3],
                                                                  v[:, :3], mode="ulysses", enable_gqa=True),
        "odd-zigzag": lambda: context_parallel_attention(q[..., :5, :], k[..., :5, :], v[..., :5, :],
                                                         layout="zigzag"),
        "bad-layout": lambda: context_parallel_attention(q, k, v, layout="strided"),
        "bad-mode": lambda: context_parallel_attention(q, k, v, mode="ring-of-fire"),
        "ring-entmax": lambda: context_parallel_attention(q, k, v, mode="ring", normalizer="entmax"),
        "ring-reference": lambda: context_parallel_attention(q, k, v, mode="ring", backend="reference"),
        "one-rank-odd-zigzag": lambda: context_parallel_attention(q[..., :6 - rank, :], k, v,
                                                                  layout="zigzag"),
        "one-rank-heads": lambda: context_parallel_attention(q[:, :4 - rank], k[:, :4 - rank],
                                                             v[:, :4 - rank], mode="ulysses"),
    }[what]
    try:
        call()
    except ValueError as e:
        return str(e)
    return "no error"


def _run_group_of_one(world, rank):
    """Each rank alone in a group of its own: the local call itself, to the last bit."""
    groups = [dist.new_group([r]) for r in range(world)]  # every rank makes every group
    q, k, v, s, _ = _tensors(world, {"gqa": True}, torch.float64)
    kwargs = dict(is_causal=True, enable_gqa=True, normalizer="entmax", length_scale=s)
    out = context_parallel_attention(q, k, v, group=groups[rank], **kwargs)
    return float((out - longattn.scaled_dot_product_attention(q, k, v, **kwargs)).abs().max())


def _run_gather(world):
    """`gather_sequence` undoes `shard_sequence` in both layouts, and its gradient is the sum of
    every rank's, scattered back."""
    x = torch.randn(3, 12 * world, 2, dtype=torch.float64)
    results = {}
    for layout in ("contiguous", "zigzag"):
        part = shard_sequence(x, layout=layout, dim=1).requires_grad_()
        whole = gather_sequence(part, layout=layout, dim=1)
        whole.backward(torch.ones_like(whole))
        results[layout] = (torch.equal(whole, x), bool((part.grad == world).all()))
    return results


def _run_model(world, mode):
    """The reference Transformer (RoPE, token shift, GQA, learnable SSMax s), float64: its
    context-parallel forward's logits are the shard of the whole sequence's, and this rank's
    share of the loss gives, summed over the ranks, the whole loss's gradient of every weight."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, positional="rope",
                               token_shift=True, normalizer="ssmax", length_scale=0.4)
    model = Transformer(config).double()
    idx = torch.randint(0, 64, (2, 8 * world))
    targets = torch.where(torch.rand(idx.shape) < 0.5, torch.randint(0, 64, idx.shape), IGNORE)
    logits = model(idx)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    want = torch.autograd.grad(loss, list(model.parameters()))

    cp = ContextParallel(mode=mode, layout="zigzag")
    mine = model(idx, context_parallel=cp)
    share = F.cross_entropy(mine.flatten(0, 1), cp.shard(targets, dim=1).flatten(), ignore_index=IGNORE,
                            reduction="sum") / (targets != IGNORE).sum()
    got = torch.autograd.grad(share, list(model.parameters()))
    for g in got:
        dist.all_reduce(g)
    errors = {"logits": rel_err(mine, cp.shard(logits, dim=1))}
    errors["grads"] = max(rel_err(g, w) for g, w in zip(got, want))
    return errors


def _run_training(world):
    """`needle.train` for 3 steps on 2 ranks (allgather, the default) and on one: the same
    losses, to float32 rounding."""
    cfg = StudyConfig(settings=("ssmax",), steps=3, batch_size=2, train_length=64, d_model=32, max_factor=1)
    losses = []
    for cp in (None, ContextParallel()):
        torch.manual_seed(1)
        model = Transformer(cfg.model_config("ssmax"))
        losses.append(train(model, cfg, seed=2, context_parallel=cp))
    return max(abs(a - b) / abs(b) for a, b in zip(*losses))


def _worker(rank, world, init_file, out_dir, names):
    """One rank: every case, each failure kept as its traceback so the others still run."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    jobs = {f"case:{name}": (lambda case=case: _run_case(world, case)) for name, case in names.items()}
    if world == 2:
        jobs.update({f"error:{what}": (lambda what=what: _run_error(world, rank, what)) for what in ERRORS})
        jobs["group-of-one"] = lambda: _run_group_of_one(world, rank)
        jobs["gather"] = lambda: _run_gather(world)
        jobs["training"] = lambda: _run_training(world)
    jobs.update({f"model:{mode}": (lambda mode=mode: _run_model(world, mode)) for mode in MODES})
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = job()
        except Exception:
            results[name] = "failed: " + traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears its group down while another still talks to it
    dist.destroy_process_group()
    # Skip the interpreter's finalization: gloo's worker threads can still be torn down there,
    # and std::terminate aborted a rank after its results were saved (1 full-suite run in 4 on
    # 2 cores, 2026-12-02; torch's own report: pytorch/pytorch#179291). The results are on disk.
    os._exit(0)


def _spawn(size, cases, tmp_path_factory):
    """Each rank's results, from one spawn of `size` ranks."""
    out_dir = tmp_path_factory.mktemp(f"cp{size}")
    mp.start_processes(_worker, args=(size, str(out_dir / "init"), str(out_dir), cases), nprocs=size,
                       start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(size)]


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    return _spawn(2, CASES, tmp_path_factory)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    return _spawn(4, CASES_4, tmp_path_factory)


@pytest.mark.parametrize("size,name", [(2, name) for name in CASES] + [(4, name) for name in CASES_4],
                         ids=[f"P2-{name}" for name in CASES] + [f"P4-{name}" for name in CASES_4])
def test_equals_the_single_process_call(request, size, name):
    """Output and every gradient of each rank's shard, to float64 rounding (the Triton kernels:
    float32's; the ring in float16: a few float16 roundings, within float16's epsilon), against
    the whole sequence on one process."""
    case = (CASES if size == 2 else CASES_4)[name]
    tolerance = case.get("tolerance", 1e-5 if name.startswith("triton") else 1e-12)
    for rank, results in enumerate(request.getfixturevalue(f"ranks{size}")):
        errors = results[f"case:{name}"]
        assert isinstance(errors, dict), errors
        for what, err in errors.items():
            assert err < tolerance, f"rank {rank} {what}: rel err {err:.2e}"


@pytest.mark.parametrize("what", list(ERRORS))
def test_bad_calls_raise_on_every_rank(ranks2, what):
    for rank, results in enumerate(ranks2):
        assert ERRORS[what] in results[f"error:{what}"], f"rank {rank}: {results[f'error:{what}']}"


def test_a_group_of_one_is_the_local_call(ranks2):
    for results in ranks2:
        assert results["group-of-one"] == 0, results["group-of-one"]


def test_gather_undoes_shard(ranks2):
    for results in ranks2:
        assert results["gather"] == {"contiguous": (True, True), "zigzag": (True, True)}, results["gather"]


@pytest.mark.parametrize("size", [2, 4], ids=["P2", "P4"])
@pytest.mark.parametrize("mode", MODES)
def test_the_reference_transformer_runs_context_parallel(request, size, mode):
    for rank, results in enumerate(request.getfixturevalue(f"ranks{size}")):
        errors = results[f"model:{mode}"]
        assert isinstance(errors, dict), errors
        for what, err in errors.items():
            assert err < 1e-12, f"rank {rank} {what}: rel err {err:.2e}"


def test_the_needle_study_trains_context_parallel(ranks2):
    for results in ranks2:
        assert isinstance(results["training"], float), results["training"]
        assert results["training"] < 1e-5, results["training"]


def test_the_transformer_refuses_what_it_cannot_shard():
    """Checked before any collective, so no process group is needed to see it."""
    model = Transformer(TransformerConfig(positional="alibi"))
    with pytest.raises(ValueError, match="takes no positional='alibi'"):
        model(torch.zeros(1, 8, dtype=torch.long), context_parallel=ContextParallel())


@pytest.mark.parametrize("offset", [None, 100], ids=["full", "causal-offset"])
def test_torch_blocks_match_softmax_across_row_blocks(offset):
    """The ring's torch blocks, over two blocks of rows (600 rows x 512 keys x 4 heads passes the
    1M-score bound): `(out, lse)` of the forward, and the backward given them, against autograd
    through plain softmax, GQA, float64."""
    q = torch.randn(1, 4, 600, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 512, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    z = 0.3 * q @ k.repeat_interleave(2, 1).transpose(-2, -1)
    if offset is not None:
        z = z.masked_fill(torch.ones(600, 512, dtype=torch.bool).triu(offset + 1), float("-inf"))
    want = torch.softmax(z, -1) @ v.repeat_interleave(2, 1)
    out, lse = torch_block_fwd(q, k, v, 0.3, offset)
    assert rel_err(out, want) < 1e-13 and rel_err(lse, torch.logsumexp(z, -1)) < 1e-13
    do = torch.randn_like(want)
    got = torch_block_bwd(do, q, k, v, out, lse, 0.3, offset)
    for name, g, w in zip(("dq", "dk", "dv"), got, torch.autograd.grad(want, (q, k, v), do)):
        assert rel_err(g, w) < 1e-12, name


def test_needs_an_initialised_process_group():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="init_process_group"):
        context_parallel_attention(q, q, q)
