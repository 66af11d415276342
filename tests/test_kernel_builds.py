"""The configurations the launchers of both kernel families pick (softmax / SSMax and sparsemax /
entmax), compiled ahead of time for sm_80 and sm_90 without a GPU: the build succeeds, nothing
spills to local memory, shared memory fits the chip, and on sm_90 the kernels with matrix
products use `wgmma`.

The launches are not hard-coded. The public launchers (`softmax_attention_fwd` / `_bwd`,
`entmax_attention_fwd` / `_bwd`) run on small CPU tensors, told which GPU generation they serve
(`device_capability`), with each kernel's launch replaced by a recorder, so whatever arguments,
constexpr switches, heuristics and `num_warps` / `num_stages` they pass today are what gets
built. Both modes are built: dense `(B, H, N, D)` launches (`_cases`) and varlen ones
(`_varlen_cases`: packed `(total, H, D)` inputs of uneven documents with `cu_seqlens_q` /
`cu_seqlens_k`, so IS_VARLEN is set and EVEN_M / EVEN_N are not), whose per-document bounds
cost registers of their own and which get some launch choices of their own, and dense ones with
key lengths (`_key_length_cases`: `seqused_k`, so HAS_KEY_LENGTHS is set, EVEN_N is not, and
each program reads its batch's key bound), and sliding windows (HAS_WINDOW,
whose loops start at the window's first tile and whose masks test a second bound) together with
softcapping, ALiBi and sinks (`_modifier_cases`: HAS_SOFTCAP, HAS_ALIBI and HAS_SINK, a tanh
and a distance per logit, a cap factor in the backward and one more term per row), and masks
(`_mask_cases`: HAS_MASK, a mask tile read per logit tile, bool with a block map and float with
its gradient's atomic adds, and the kernel that counts each row's allowed keys). Each recorded
argument is specialised as Triton's JIT does at a real launch (see `_specialise`), then
compiled by `triton.compile` in worker processes that import the kernels with
TRITON_INTERPRET=0 (the interpreter's kernels cannot be compiled) and a fresh cache.
Run with `-s` to see the table of registers, shared and local memory per build.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch
import triton

# longattn is imported inside functions only: collecting this file touches no kernel, and the
# worker processes (spawned with TRITON_INTERPRET=0) import their own, compilable, copy.

# Max shared memory per block (dynamic, opt-in) of each chip, CUDA programming guide table 21.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
HEAD_DIMS = [64, 128]
LENGTHS = {"even": 4096, "uneven": 1000}  # 1000 is a multiple of neither block (64, 32)
DOCUMENTS = (300, 1000, 77)  # varlen: 3 packed documents of uneven lengths
TORCH_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                torch.uint8: "u8", torch.bool: "i1"}
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class _Pointer:
    """What a tensor argument contributes to a build: its element type and 16-byte alignment."""

    def __init__(self, dtype: str, aligned: bool):
        self.dtype, self.aligned = dtype, aligned


# ----------------------------------------------------------------------------------------------
# Recording the launches (main process)
# ----------------------------------------------------------------------------------------------


def _kernels(module):
    """`{name: (public object, the object whose run() a launch reaches)}` for each Triton function
    in `module`'s namespace, where its launchers find every kernel they launch (a family's
    kernels may be defined in modules of their own and imported): `kernel[grid](...)` goes
    through `@triton.heuristics` (which adds its flags to the keyword arguments) down to the JIT
    or interpreted function's `run`. The `@triton.jit` helpers are listed too; they are never
    launched."""
    found = {}
    for name, obj in vars(module).items():
        if isinstance(obj, triton.runtime.jit.KernelInterface):
            inner = obj
            while isinstance(getattr(inner, "fn", None), triton.runtime.jit.KernelInterface):
                inner = inner.fn
            found[name] = (obj, inner)
    return found


def _describe(value, dtype_name):
    """A picklable stand-in for one argument; fp16 tensors become `dtype_name` tensors."""
    if torch.is_tensor(value):
        name = TORCH_DTYPES[value.dtype]
        return _Pointer(dtype_name if name == "fp16" else name, value.data_ptr() % 16 == 0)
    return value


def record_launches(module, call, dtype_names, capability):
    """Runs `call()` with every kernel launch of `module` recorded instead of run, the launchers
    told they run on `sm_<capability>`. Returns one build description per launch and dtype:
    `(kernel name, {arg: value}, launch options)`."""
    launches = []
    with pytest.MonkeyPatch.context() as mp:
        if hasattr(module, "device_capability"):
            mp.setattr(module, "device_capability", lambda device: capability)
        for name, (_, inner) in _kernels(module).items():
            def run(*args, grid, warmup, _name=name, _inner=inner, **kwargs):
                launches.append((_name, args, kwargs))
            mp.setattr(inner, "run", run)
        call()
    builds = []
    for name, args, kwargs in launches:
        fn = _kernels(module)[name][1].fn  # the python function under the JIT / interpreter
        arg_names = list(inspect.signature(fn).parameters)
        bound = dict(zip(arg_names, args, strict=False))  # the rest come as keywords
        bound.update({k: v for k, v in kwargs.items() if k in arg_names})
        options = {k: v for k, v in kwargs.items() if k not in arg_names}
        for dtype_name in dtype_names:
            builds.append((name, {k: _describe(v, dtype_name) for k, v in bound.items()}, options))
    return builds


# ----------------------------------------------------------------------------------------------
# Building (worker processes)
# ----------------------------------------------------------------------------------------------


def _specialise(param, value):
    """`(signature type, constexpr value or None, divisibility attr)` of one argument, by the rules
    of Triton's JIT launch (`native_specialize_impl`): ints equal to 1 become constexprs, ints
    and pointers divisible by 16 carry `tt.divisibility=16`, floats are fp32, None a constexpr."""
    if param.is_constexpr or value is None:
        return "constexpr", value, False
    if isinstance(value, _Pointer):
        return "*" + value.dtype, None, value.aligned and not param.do_not_specialize_on_alignment
    if isinstance(value, bool):
        return "u1", None, False
    if isinstance(value, int):
        if value == 1 and not param.do_not_specialize:
            return "constexpr", 1, False
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, None, value % 16 == 0 and not param.do_not_specialize
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"no Triton type for argument {param.name}={value!r}")


def _run_tool(tool, *args):
    return subprocess.run([os.path.join(NVIDIA_BIN, tool), *args], capture_output=True, text=True,
                          check=True).stdout


def _module(family):
    import importlib

    return importlib.import_module(f"longattn.kernels.{family}")


def _kernel_modules():
    """Every module of `longattn.kernels`: the family modules and those they import kernels and
    helpers from."""
    import importlib
    import pkgutil

    import longattn.kernels as package

    names = [info.name for info in pkgutil.iter_modules(package.__path__)]
    return [importlib.import_module(f"{package.__name__}.{name}") for name in names]


def _has_dot(jit_fn, seen=()) -> bool:
    """Whether a kernel has a matrix product: a `tl.dot` in its source or in that of a
    `@triton.jit` helper it calls (entmax's passes hold theirs), in any kernel module."""
    source = inspect.getsource(jit_fn.fn)
    if "tl.dot(" in source:
        return True
    functions = {name: inner for module in _kernel_modules() for name, (_, inner) in _kernels(module).items()}
    helpers = {name: inner for name, inner in functions.items()
               if name not in seen and re.search(rf"\b{name}\(", source)}
    return any(_has_dot(inner, (*seen, *helpers)) for inner in helpers.values())


def build(family, name, bound, options, capability):
    """Compiles one launch for `sm_<capability>`; returns its resource usage."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    module = _module(family)

    target = GPUTarget("cuda", capability, 32)
    jit_fn = _kernels(module)[name][1]
    assert isinstance(jit_fn, triton.runtime.jit.JITFunction), "the worker must not interpret"
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(jit_fn.params):
        kind, const, divisible = _specialise(param, bound[param.name])
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = const
        if divisible:
            attrs[(i,)] = CUDABackend(target).parse_attr("D")
    kernel = triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target, options=options)

    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = _run_tool("cuobjdump", "--dump-resource-usage", cubin)
        sass = _run_tool("cuobjdump", "-sass", cubin) if capability >= 90 else ""
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    halves = (v.dtype for v in bound.values() if isinstance(v, _Pointer) and v.dtype in ("fp16", "bf16"))
    dtype = next(halves, "-")  # the count kernel reads no tensor of the inputs' dtype
    return {
        "kernel": name, "sm": capability, "dtype": dtype,
        "config": " ".join(f"{k}={bound[k]}" for k in sorted(bound) if k.isupper()),
        "warps": options.get("num_warps"), "stages": options.get("num_stages"),
        "regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
        # cuobjdump counts static shared memory; Triton's is dynamic and lives in the metadata
        "shared": int(fields["SHARED"]) + kernel.metadata.shared,
        "wgmma_ptx": ptx.count("wgmma.mma_async"), "mma_sync_ptx": ptx.count("mma.sync"),
        "hgmma_sass": sass.count("HGMMA"),
        "has_dot": _has_dot(jit_fn),
    }


# ----------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------


def _cases():
    """`(family, D, N, causal, length scaling, alpha, dtypes)` of each dense launcher run: the
    dispatcher's choices (tile_config, the heuristics' EVEN_* and ALPHA_* flags) follow from
    these. Even lengths cover the whole grid; the uneven length (the masked loads and the
    key-bound mask) is built with key lengths (`_key_length_cases`: the same launches plus one
    bound a program) and masks (`_mask_cases`). Softmax builds the plain kernel and the one with
    every switch (causal and length-scaled: the most registers), not each combination between.
    The entmax kernels have three variants (sparsemax, alpha 1.5, a pow for other alpha), so
    each variant gets a subset of the switches, covering each switch at least once per head
    dim, to keep the file near two minutes on 2 cores."""
    for d in HEAD_DIMS:
        yield "softmax", d, LENGTHS["even"], False, False, None, ["bf16"]
        yield "softmax", d, LENGTHS["even"], True, True, None, ["fp16", "bf16"]
        yield "entmax", d, LENGTHS["even"], False, False, 2.0, ["bf16"]  # fp16: the varlen cases
        yield "entmax", d, LENGTHS["even"], True, True, 1.5, ["fp16"]
        yield "entmax", d, LENGTHS["even"], True, False, 1.25, ["bf16"]


def _varlen_cases():
    """The same tuples for varlen runs (`DOCUMENTS` packed, IS_VARLEN; EVEN_M / EVEN_N are then
    always False): the kernels read each document's bounds from cu_seqlens, which keeps more
    alive than the dense runs. Each switch once per head dim and family (causal and not, length
    scaling and not; each entmax alpha variant), mostly fp16, bf16 where a case has no twin."""
    docs = DOCUMENTS
    for d in HEAD_DIMS:
        yield "softmax", d, docs, False, True, None, ["fp16", "bf16"]
        yield "softmax", d, docs, True, False, None, ["fp16"]
        yield "entmax", d, docs, False, False, 2.0, ["fp16"]
        yield "entmax", d, docs, True, True, 1.5, ["bf16"]
        yield "entmax", d, docs, True, True, 1.25, ["fp16"]
        yield "entmax", d, docs, False, True, 1.25, ["fp16"]


def _key_length_cases():
    """The same tuples for dense runs with key lengths (`seqused_k`): the softmax kernels and the
    entmax ones at their most register-hungry (alpha 1.25's pow, causal, length scaling) and at
    sparsemax's, per head dim. The causal ones count from each batch's end (CAUSAL_FROM_END,
    decoding into caches of different fill), as `_launcher_call` passes them."""
    for d in HEAD_DIMS:
        yield "softmax", d, LENGTHS["uneven"], True, True, None, ["fp16"]
        yield "entmax", d, LENGTHS["uneven"], True, True, 1.25, ["fp16"]
        yield "entmax", d, LENGTHS["even"], False, False, 2.0, ["bf16"]


ALL_MODIFIERS = ("softcap", "alibi", "sink")


def _modifier_cases():
    """A sliding window of 256 keys with softcapping, ALiBi and sinks, causal and length-scaled:
    dense softmax with all of them at once; for entmax at alpha 1.25 (the pow), the combinations
    models use, Gemma 2's window and cap with gpt-oss's sink (dense, uneven) and ALiBi with a
    sink beside a window counted from each document's end (varlen). All four at once with
    length scaling in entmax's dQ takes 255 registers and 8 bytes of stack on sm_80 (bf16,
    D = 128), the one combination left out: no model we know combines them."""
    for d in HEAD_DIMS:
        uneven, gemma_oss, alibi_oss = LENGTHS["uneven"], ("softcap", "sink"), ("alibi", "sink")
        yield "softmax", d, uneven, True, True, None, ["fp16"], {"window": True, "modifiers": ALL_MODIFIERS}
        yield "entmax", d, uneven, True, True, 1.25, ["bf16"], {"window": True, "modifiers": gemma_oss}
        yield "entmax", d, DOCUMENTS, True, True, 1.25, ["fp16"], {"window": True, "modifiers": alibi_oss}


def _mask_cases():
    """Dense runs with an `attn_mask` read through its strides: a boolean padding mask with a
    block map (HAS_MASK, MASK_IS_BOOL, HAS_BLOCK_MAP: the tile tests and skips, the count kernel)
    and a float mask whose gradient is wanted (the dQ kernels' atomic adds), causal and
    length-scaled at the uneven length, for softmax and for entmax's pow (alpha 1.25) and
    sparsemax."""
    for d in HEAD_DIMS:
        uneven = LENGTHS["uneven"]
        yield "softmax", d, uneven, True, True, None, ["fp16"], {"mask": "bool"}
        yield "softmax", d, uneven, True, True, None, ["bf16"], {"mask": "float"}
        yield "entmax", d, uneven, True, True, 1.25, ["fp16"], {"mask": "float"}
        yield "entmax", d, uneven, True, False, 2.0, ["bf16"], {"mask": "bool"}
    # a learned bias per key: its gradient summed over each tile's rows before the atomic add
    yield "entmax", 128, LENGTHS["uneven"], True, True, 1.25, ["fp16"], {"mask": "float keys"}


def _head_alpha_cases():
    """Per-head alphas read in-kernel (HAS_HEAD_ALPHA) with alpha's gradient in the dQ kernel
    (ALPHA_GRAD), causal and length-scaled, dense at the uneven length and packed."""
    for d in HEAD_DIMS:
        yield "entmax", d, LENGTHS["uneven"], True, True, 1.25, ["bf16"], {"head_alpha": True}
    yield "entmax", 128, DOCUMENTS, True, True, 1.25, ["fp16"], {"head_alpha": True}


def _launcher_call(family, d, n, causal, scaled, alpha, key_lengths=False, window=False, modifiers=(),
                   mask=None, head_alpha=False):
    """Forward then backward through the public launchers. GQA with a group of 2, so GROUP is a
    runtime value rather than the constexpr 1 that Hq == Hkv gives. `n` is a length (dense
    `(1, H, n, d)` inputs) or a tuple of document lengths (varlen: packed `(total, H, d)` inputs,
    cu_seqlens the same for queries and keys). `key_lengths`: dense, with `seqused_k` (and, when
    causal, the bounds counted from each batch's key length). `window`:
    a sliding window's left edge 256 keys back (varlen: counted from each document's end).
    `modifiers`: which of a softcap, ALiBi slopes and sinks (`ALL_MODIFIERS`). `mask`: "bool", a
    `(1, 1, 1, n)` padding mask with a block map of 128-blocks, or "float", a `(1, 2, n, n)`
    float16 mask whose gradient the backward computes ("float keys": `(1, 1, 1, n)`).
    `head_alpha`: one alpha per head, from memory, and its gradient."""
    module = _module(family)
    extra = {"window_offset": -256} if window else {}
    if key_lengths and causal:
        extra["causal_from_end"] = True
    bwd_extra = {}
    if mask == "bool":
        extra.update(attn_mask=torch.ones(1, 1, 1, n, dtype=torch.bool),
                     block_map=torch.ones(1, 1, -(-n // 128), -(-n // 128), dtype=torch.bool))
    elif mask in ("float", "float keys"):
        shape = (1, 2, n, n) if mask == "float" else (1, 1, 1, n)
        extra["attn_mask"] = torch.zeros(shape, dtype=torch.float16)
        bwd_extra["mask_grad"] = True
    if "softcap" in modifiers:
        extra["softcap"] = 30.0
    if "alibi" in modifiers:
        extra.update(alibi_slopes=torch.tensor([0.5, 0.25]), alibi_offset=0)
    if "sink" in modifiers:
        extra["sink"] = torch.tensor([0.5, -1.0])
    if head_alpha:
        extra["alphas"] = torch.tensor([alpha, 1.75])
        bwd_extra["alpha_grad"] = True

    def call():
        varlen = ()
        seqused_k = torch.tensor([n // 2], dtype=torch.int32) if key_lengths else None
        if isinstance(n, tuple):
            total = sum(n)
            cu = torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
            q = torch.zeros(total, 2, d, dtype=torch.float16)
            kv = torch.zeros(total, 1, d, dtype=torch.float16)
            varlen = (cu, cu, max(n), max(n), window)  # causal_from_end with the window
        else:
            q = torch.zeros(1, 2, n, d, dtype=torch.float16)
            kv = torch.zeros(1, 1, n, d, dtype=torch.float16)
        s = torch.full((2,), 0.43) if scaled else None
        offset = 0 if causal else None
        if family == "softmax":
            out, lse = module.softmax_attention_fwd(q, kv, kv, d ** -0.5, offset, s, *varlen,
                                                    seqused_k=seqused_k, **extra)
            module.softmax_attention_bwd(out, q, kv, kv, out, lse, d ** -0.5, offset, s, None, *varlen,
                                         seqused_k=seqused_k, **extra, **bwd_extra)
        else:
            out, row_max, tau, flags = module.entmax_attention_fwd(q, kv, kv, d ** -0.5, alpha, offset, s,
                                                                   *varlen, seqused_k=seqused_k, **extra)
            module.entmax_attention_bwd(out, q, kv, kv, row_max, tau, flags, d ** -0.5, alpha, offset, s,
                                        *varlen, seqused_k=seqused_k, **extra, **bwd_extra)
    return call


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    for tool in ("cuobjdump", "ptxas"):
        if not os.access(os.path.join(NVIDIA_BIN, tool), os.X_OK):
            pytest.skip(f"triton's NVIDIA backend has no {tool} in {NVIDIA_BIN}")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton's NVIDIA backend is unavailable: {e}")
    launches = []
    for sm in SHARED_LIMIT:
        runs = [(case, {}) for case in (*_cases(), *_varlen_cases())]
        runs += [(case, {"key_lengths": True}) for case in _key_length_cases()]
        runs += [(case[:-1], case[-1]) for case in (*_modifier_cases(), *_mask_cases(), *_head_alpha_cases())]
        for (family, d, n, causal, scaled, alpha, dtype_names), switches in runs:
            call = _launcher_call(family, d, n, causal, scaled, alpha, **switches)
            launches += [(family, *b, sm) for b in record_launches(_module(family), call, dtype_names, sm)]
    unique = {}
    for family, name, bound, options, sm in launches:  # e.g. softmax's preprocess ignores causal, scaling
        key = (name, repr(sorted((k, vars(v) if isinstance(v, _Pointer) else v) for k, v in bound.items())),
               repr(sorted(options.items())), sm)
        unique.setdefault(key, (family, name, bound, options, sm))
    jobs = list(unique.values())
    # Spawned workers inherit the environment: the kernels (and triton's own library functions,
    # jitted when triton is imported) must be compiled, not interpreted; the cache starts empty,
    # so every run really compiles.
    cache_dir = str(tmp_path_factory.mktemp("triton_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        mp.setenv("TRITON_CACHE_DIR", cache_dir)
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=2, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = [pool.submit(build, *job) for job in jobs]
            results, failures = [], []
            for job, future in zip(jobs, futures, strict=True):
                try:
                    results.append(future.result())
                except Exception as e:  # reported together below, with the configuration
                    failures.append(f"{job[1]} sm_{job[4]} {job[3]}: {e!r}")
    shutil.rmtree(cache_dir, ignore_errors=True)
    _print_table(results)
    assert not failures, "builds failed:\n" + "\n".join(failures)
    return results


def _print_table(results):
    print("\n| kernel | sm | dtype | warps/stages | config | regs | local | stack | shared B | wgmma (ptx) | "
          "HGMMA (sass) | mma.sync (ptx) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["kernel"], r["sm"], r["dtype"], r["config"])):
        print(f"| {r['kernel']} | {r['sm']} | {r['dtype']} | {r['warps']}/{r['stages']} | {r['config']} | "
              f"{r['regs']} | {r['local']} | {r['stack']} | {r['shared']} | {r['wgmma_ptx']} | "
              f"{r['hgmma_sass']} | {r['mma_sync_ptx']} |")


def _summary(rows):
    return "\n".join(f"{r['kernel']} sm_{r['sm']} {r['dtype']} {r['config']}: regs {r['regs']}, "
                     f"local {r['local']}, stack {r['stack']}, shared {r['shared']} B" for r in rows)


def test_every_launched_kernel_was_built(builds):
    """Every kernel of every kernel module was launched by the launchers and built. A kernel is
    a Triton function that reads `tl.program_id`: the helpers (`kernels/program.py`'s prologue
    too) are handed the program ids."""
    launched = {r["kernel"] for r in builds}
    jitted = {name for module in _kernel_modules() for name, (_, inner) in _kernels(module).items()
              if "tl.program_id" in inspect.getsource(inner.fn)}
    assert launched == jitted, f"kernels never launched by the launchers: {jitted - launched}"
    assert {r["sm"] for r in builds} == set(SHARED_LIMIT)


def test_no_register_spills(builds):
    """Spilled registers live in the stack frame: cuobjdump reports them as STACK (ptxas -v as
    "bytes spill stores"), while its LOCAL stays 0, so both must be 0."""
    spilled = [r for r in builds if r["local"] or r["stack"]]
    assert not spilled, "builds that spill to local memory:\n" + _summary(spilled)


def test_shared_memory_fits_the_chip(builds):
    over = [r for r in builds if r["shared"] > SHARED_LIMIT[r["sm"]]]
    assert not over, "builds over the chip's shared memory per block:\n" + _summary(over)


def test_sm90_matrix_products_use_wgmma(builds):
    """Every kernel with a `tl.dot` (its own or its helpers') gets Hopper's warpgroup MMA on sm_90
    (64-row tiles, 4 or 8 warps, fp16/bf16 operands all qualify), and no dot falls back to
    Ampere's `mma.sync`.
    Softmax's bwd preprocess kernel has no matrix product, nor the count kernel."""
    sm90 = [r for r in builds if r["sm"] == 90 and r["has_dot"]]
    assert sm90
    # entmax's dQ holds 32 rows for a float mask's gradient at D = 128 in 16 bits (64 spilled;
    # kernels/entmax.py): too few for wgmma's 64, so it takes mma.sync, the one exception
    narrow = [r for r in sm90 if r["kernel"] == "entmax_attention_bwd_kernel_dq"
              and "BLOCK_M=32" in r["config"] and "MASK_GRAD=True" in r["config"]]
    assert narrow and all(r["mma_sync_ptx"] and not r["wgmma_ptx"] for r in narrow)
    sm90 = [r for r in sm90 if r not in narrow]
    missing = [r for r in sm90 if not (r["wgmma_ptx"] and r["hgmma_sass"]) or r["mma_sync_ptx"]]
    assert not missing, "sm_90 builds without wgmma (or with mma.sync):\n" + "\n".join(
        f"{r['kernel']} {r['dtype']} {r['config']}: wgmma {r['wgmma_ptx']}, HGMMA {r['hgmma_sass']}, "
        f"mma.sync {r['mma_sync_ptx']}" for r in missing)
    sm80 = [r for r in builds if r["sm"] == 80 and r["has_dot"]]
    assert all(r["mma_sync_ptx"] and not r["wgmma_ptx"] for r in sm80), "sm_80 builds should use mma.sync"
