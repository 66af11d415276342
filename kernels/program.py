"""The `@triton.jit` building blocks every program of both kernel families is made of: the
prologue that places a program on its sequence (dense or a varlen document), the per-row logit
scales, the key range and mask of the causal rule, and masked tile loads and stores.

Helpers are inlined into the kernels that call them: splitting a kernel into them adds no call.
They take the program ids as arguments rather than reading them: a kernel is a function that
reads `tl.program_id` (tests/test_kernel_builds.py finds the kernels that way).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def doc_span(cu_seqlens_q, cu_seqlens_k, i_doc):
    """Varlen: document `i_doc`'s first query row and first key in the packed sequences (int64)
    and its numbers of queries and keys."""
    bos_q = tl.load(cu_seqlens_q + i_doc)
    bos_k = tl.load(cu_seqlens_k + i_doc)
    len_q = tl.load(cu_seqlens_q + i_doc + 1) - bos_q
    len_k = tl.load(cu_seqlens_k + i_doc + 1) - bos_k
    return bos_q.to(tl.int64), bos_k.to(tl.int64), len_q, len_k


@triton.jit
def program_prologue(i_blk, i_bh, cu_seqlens_q, cu_seqlens_k, seqused_k, H, GROUP, Nq, Nk, causal_offset,
                     window_offset, alibi_offset, BLOCK: tl.constexpr, KEY_BLOCKS: tl.constexpr,
                     IS_VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, CAUSAL_FROM_END: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Where the program with ids `(i_blk, i_bh)` works: the one prologue of every kernel.

    A query-block program (forward, dQ; `KEY_BLOCKS` false) holds block `i_blk` of the rows of
    query head `i_h`, `i_bh` counting (batch, query head) and `H = Hq`. A key-block program
    (dK/dV) holds block `i_blk` of the keys of KV head `i_hkv`, `i_bh` counting (batch, KV head)
    and `H = Hkv`; its `i_h` is the group's first query head. In varlen mode the batch index is
    the document (the batch strides are 0).

    Returns `(i_b, i_h, i_hkv, bos_q, bos_k, Nq, Nk, causal_offset, window_offset, alibi_offset, row,
    done)`:
    - `bos_q`, `bos_k`: the sequence's first query row and key in the packed layout (int64; 0
      when dense), for the base pointers (`sequence_offset`);
    - `Nq`, `Nk`: the sequence's lengths (the document's in varlen mode); with `HAS_KEY_LENGTHS`
      (dense only) `Nk` is the batch's used key length `seqused_k[i_b]`, clamped to `[0, Nk]`
      as flash-attn's, so every bound and mask below it (`keys_seen`, `key_end`,
      `allowed_keys`, the loads and stores) leaves the later keys out;
    - `causal_offset`: the sequence's; with `CAUSAL_FROM_END` (set only with the causal mask)
      the one given counts from the sequence's bottom-right corner (the document's in varlen
      mode, `(Nq, seqused_k[i_b])` with `HAS_KEY_LENGTHS`), so the sequence's is
      `causal_offset + Nk - Nq`, clamped to `[-Nq, Nk]` as the launchers clamp (`causal_args`),
      which changes no row;
    - `window_offset`: the sliding window's left edge, key j allowed for row i iff
      `j >= i + window_offset` (with `HAS_WINDOW`), and ALiBi's diagonal, distances
      `|j - i - alibi_offset|` (with `HAS_ALIBI`), both moved to the same corner as the
      causal offset is;
    - `row`: head `i_h`'s first row in the per-row statistics (`head_row`);
    - `done`: the block starts past the document's end (the grid spans the longest document; a
      dense grid has no such block but a key block past the used key length), so the program
      returns at once."""
    i_b, i_hh = i_bh // H, i_bh % H
    if KEY_BLOCKS:
        i_hkv = i_hh
        i_h = i_hkv * GROUP
    else:
        i_h = i_hh
        i_hkv = i_h // GROUP  # GQA: the group's K/V are read in place, never repeated
    bos_q = 0
    bos_k = 0
    done = False
    if IS_VARLEN:  # Nq is the packed length until it becomes the document's
        bos_q, bos_k, len_q, len_k = doc_span(cu_seqlens_q, cu_seqlens_k, i_b)
        done = i_blk * BLOCK >= (len_k if KEY_BLOCKS else len_q)
        row = head_row(i_b, i_h, None, Nq, bos_q, True)  # no batch dim: Hq is not needed
        Nq, Nk = len_q, len_k
    else:
        if HAS_KEY_LENGTHS:  # the launchers zero-fill dK, dV for the key blocks that return here
            Nk = tl.minimum(tl.maximum(tl.load(seqused_k + i_b), 0), Nk)
            if KEY_BLOCKS:
                done = i_blk * BLOCK >= Nk
        if KEY_BLOCKS:
            row = head_row(i_b, i_h, H * GROUP, Nq, 0, False)
        else:
            row = i_bh.to(tl.int64) * Nq  # head_row's, with i_bh = i_b * Hq + i_h at hand
    if CAUSAL_FROM_END:
        causal_offset = tl.maximum(tl.minimum(causal_offset + Nk - Nq, Nk), -Nq)
        if HAS_WINDOW:
            window_offset = tl.maximum(tl.minimum(window_offset + Nk - Nq, Nk), -Nq)
        if HAS_ALIBI:  # not clamped: the distances, hence a sink's share, depend on it exactly
            alibi_offset = alibi_offset + Nk - Nq
    return i_b, i_h, i_hkv, bos_q, bos_k, Nq, Nk, causal_offset, window_offset, alibi_offset, row, done


@triton.jit
def head_row(i_b, i_h, Hq, Nq, bos_q, IS_VARLEN: tl.constexpr):
    """The offset of (batch `i_b`, head `i_h`)'s first row in the per-row statistics (lse, delta,
    row max, tau): `(B, Hq, Nq)`, or in varlen mode `(Hq, total_q)`, `Nq` the packed length
    `total_q` and `bos_q` the document's first row."""
    if IS_VARLEN:
        row = i_h.to(tl.int64) * Nq + bos_q
    else:
        row = (i_b * Hq + i_h).to(tl.int64) * Nq
    return row


@triton.jit
def sequence_offset(i_b, i_h, bos, stride_b, stride_h, stride_n):
    """The int64 offset of the first row `bos` of (batch `i_b`, head `i_h`)'s sequence: cast
    before multiplying by the strides, so large tensors do not overflow int32."""
    return i_b.to(tl.int64) * stride_b + i_h.to(tl.int64) * stride_h + bos * stride_n


@triton.jit
def keys_seen(offs_m, Nk, causal_offset, window_offset, HAS_WINDOW: tl.constexpr):
    """n_i, the number of keys each row may see (`j < Nk`, `j <= i + causal_offset`, and with a
    window `j >= i + window_offset`), [BM]: 0 tells an empty row from one whose every allowed
    logit is -inf."""
    end = tl.minimum(offs_m + causal_offset + 1, Nk)
    if HAS_WINDOW:
        end = end - tl.maximum(offs_m + window_offset, 0)
    return tl.maximum(end, 0)


@triton.jit
def row_keys(key_counts, row, offs_m, Nq, Nk, causal_offset, window_offset, HAS_WINDOW: tl.constexpr,
             HAS_KEY_COUNTS: tl.constexpr):
    """n_i [BM]: `keys_seen`, or with a mask or block map the count the launcher's count kernel
    stored (`key_counts`, laid out as the lse, `row` the head's first row), which no bound
    alone can give."""
    if HAS_KEY_COUNTS:
        n_i = tl.load(key_counts + row + offs_m, mask=offs_m < Nq, other=0)
    else:
        n_i = keys_seen(offs_m, Nk, causal_offset, window_offset, HAS_WINDOW)
    return n_i


@triton.jit
def row_scales(s, i_h, offs_m, Nk, scale, causal_offset, window_offset,
               BLOCK_M: tl.constexpr, HAS_LENGTH_SCALE: tl.constexpr, HAS_WINDOW: tl.constexpr,
               key_counts, row, Nq, HAS_KEY_COUNTS: tl.constexpr):
    """Per-row logit factor `scale * f_i` (f_i = s_h ln(n_i), or 1) and, for the gradient of s,
    `scale * ln(n_i)`; both [BM]. Rows that see no key use n_i = 1 (they are masked anyway)."""
    f_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + scale
    ln_n = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LENGTH_SCALE:
        n_i = row_keys(key_counts, row, offs_m, Nq, Nk, causal_offset, window_offset, HAS_WINDOW,
                       HAS_KEY_COUNTS)
        ln_n = tl.log(tl.maximum(n_i, 1).to(tl.float32))
        f_scale = f_scale * tl.load(s + i_h) * ln_n
    return f_scale, scale * ln_n


@triton.jit
def key_end(i_m, Nq, Nk, causal_offset, BLOCK_M: tl.constexpr):
    """One past the last key any row of query block `i_m` may see: later key blocks are skipped."""
    end = tl.minimum((i_m + 1) * BLOCK_M, Nq) + causal_offset
    return tl.maximum(tl.minimum(end, Nk), 0)


@triton.jit
def key_start(i_m, Nk, window_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The first key tile any row of query block `i_m` may see (a multiple of BLOCK_N): with a
    window, the tiles before it are skipped, so a program visits `(BLOCK_M + w) / BLOCK_N`
    tiles, not `Nk / BLOCK_N`. Where no row sees any key, the loop is empty or visits one tile
    the masks leave empty."""
    start = 0
    if HAS_WINDOW:
        start = tl.minimum(tl.maximum(i_m * BLOCK_M + window_offset, 0), Nk) // BLOCK_N * BLOCK_N
    return start


@triton.jit
def query_range(i_n, Nq, Nk, causal_offset, window_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_WINDOW: tl.constexpr):
    """`(start, end)`: the query rows that may see a key of key block `i_n`, from a multiple of
    BLOCK_M (the causal rule: the first row that sees key j0 is `j0 - causal_offset`; the window:
    the last that sees key j1 is `j1 - window_offset`). The dK/dV programs loop over these only."""
    start = tl.maximum(i_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
    end = Nq
    if HAS_WINDOW:
        end = tl.maximum(tl.minimum(tl.minimum((i_n + 1) * BLOCK_N, Nk) - window_offset, Nq), 0)
    return start, end


@triton.jit
def allowed_keys(offs_m, offs_n, Nk, causal_offset, window_offset, IS_CAUSAL: tl.constexpr,
                 EVEN_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[BM, BN] (or [1, BN]) mask of the keys each row may see."""
    if IS_CAUSAL:
        allowed = offs_n[None, :] <= offs_m[:, None] + causal_offset
        if not EVEN_N:
            allowed = allowed & (offs_n[None, :] < Nk)
    else:
        allowed = offs_n[None, :] < Nk
    if HAS_WINDOW:
        allowed = allowed & (offs_n[None, :] >= offs_m[:, None] + window_offset)
    return allowed


@triton.jit
def mask_tile(mask, rows, cols, Nq, Nk, stride_mm, stride_mn, mask_floor, MASK_IS_BOOL: tl.constexpr):
    """`(allowed, bias)` of the `attn_mask` entries at `rows` x `cols` (2-D index tensors that
    broadcast to the tile: `[BM, 1]` and `[1, BN]`, or transposed), read through the mask's
    strides from `mask`, the program's (batch, head) base: a broadcast dim has stride 0, so no
    mask is ever expanded in memory. A boolean mask (bytes) allows its non-zero entries; a float
    one all but those at or below `mask_floor` (`reference.float_mask_allows`: -inf and the
    dtype's lowest value; a NaN entry is allowed and poisons its row), and `bias` is the entry
    where allowed, 0 elsewhere, in natural units (0 for a boolean mask). Entries past Nq or Nk
    are not read and not allowed."""
    inside = (rows < Nq) & (cols < Nk)
    ptrs = mask + rows.to(tl.int64) * stride_mm + cols * stride_mn
    if MASK_IS_BOOL:
        allowed = tl.load(ptrs, mask=inside, other=0) != 0
        bias = 0.0
    else:
        entry = tl.load(ptrs, mask=inside, other=float("-inf"))
        allowed = inside & ((entry != entry) | (entry > mask_floor))
        bias = tl.where(allowed, entry.to(tl.float32), 0.0)
    return allowed, bias


@triton.jit
def tile_live(block_map, mask, row0, col0, rows, cols, Nq, Nk, stride_bm, stride_bn, stride_mm, stride_mn,
              MAP_BLOCK: tl.constexpr, HAS_BLOCK_MAP: tl.constexpr, HAS_MASK: tl.constexpr,
              MASK_IS_BOOL: tl.constexpr):
    """Whether the tile at (`row0`, `col0`) may hold an allowed key: its block map flag (the map
    in blocks of MAP_BLOCK, a multiple of every tile, so one flag covers a tile) and, for a
    boolean mask, any of its entries. A tile that is not live is skipped: no K or V is loaded.
    True (a constant, so the branch compiles away) without either."""
    live = True
    if HAS_MASK:
        if MASK_IS_BOOL:
            allowed, _ = mask_tile(mask, rows, cols, Nq, Nk, stride_mm, stride_mn, 0.0, True)
            live = tl.max(tl.max(allowed.to(tl.int32), 1), 0) > 0
    if HAS_BLOCK_MAP:
        flag = tl.load(block_map + (row0 // MAP_BLOCK) * stride_bm + (col0 // MAP_BLOCK) * stride_bn) != 0
        live = flag & live
    return live


@triton.jit
def add_mask_grad(dmask, dz, offs_m, cols, mask_m, mask_n, stride_gm, stride_gn, SUM_ROWS: tl.constexpr,
                  SUM_KEYS: tl.constexpr):
    """Adds a tile's logit gradients `dz` [BM, BN] (rows `offs_m`, keys `cols`) into the float
    mask's gradient at `dmask`, the program's (batch, head) base, atomically: the heads and
    batches a mask entry serves meet there. Where the mask broadcasts along rows (keys), its
    gradient has one row (key), and the tile is summed along them first."""
    if SUM_ROWS and SUM_KEYS:
        tl.atomic_add(dmask, tl.sum(tl.sum(dz, 1), 0), sem="relaxed")
    elif SUM_ROWS:
        tl.atomic_add(dmask + cols * stride_gn, tl.sum(dz, 0), mask=mask_n, sem="relaxed")
    elif SUM_KEYS:
        tl.atomic_add(dmask + offs_m.to(tl.int64) * stride_gm, tl.sum(dz, 1), mask=mask_m, sem="relaxed")
    else:
        p_dmask = dmask + offs_m.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn
        tl.atomic_add(p_dmask, dz, mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")


@triton.jit
def tanh(x):
    """`1 - 2 / (e^2x + 1)`: exact at +-inf, and no libdevice call (the interpreter has none)."""
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # 2 / ln 2


@triton.jit
def alibi_slope(alibi, i_b, i_h, Hq, HAS_ALIBI: tl.constexpr):
    """Head `i_h`'s ALiBi slope for batch (or document) `i_b`, in the kernel's logit units (the
    launcher scaled the `(B, Hq)` slopes); 0 without ALiBi."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(alibi + i_b.to(tl.int64) * Hq + i_h)
    return slope


@triton.jit
def modify_logits(x, distance, slope, softcap, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """The logits `x = c_i q.k` of a tile, capped and biased as the reference does: `softcap *
    tanh(x / softcap)` (Gemma 2), then `- slope * |distance|` (ALiBi; `distance = j - i -
    alibi_offset` in the tile's layout). `softcap` and `slope` are in the kernel's own units (the
    launchers scaled them: base 2 for softmax, entmax's alpha - 1), where both rules look alike."""
    if HAS_SOFTCAP:
        x = softcap * tanh(x / softcap)
    if HAS_ALIBI:
        x = x - slope * tl.abs(distance).to(tl.float32)
    return x


@triton.jit
def softcap_slope(x, softcap):
    """`d cap(x) / dx = 1 - tanh^2(x / softcap)` of the uncapped logits `x`: the backward's
    factor from the capped logits' gradient to theirs."""
    t = tanh(x / softcap)
    return 1.0 - t * t


@triton.jit
def load_tile(ptrs, mask_rows, mask_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """A 2-D tile, zero-filled past the end; masked only along dims that may run past it."""
    if EVEN_ROWS and EVEN_COLS:
        tile = tl.load(ptrs)
    elif EVEN_ROWS:
        tile = tl.load(ptrs, mask=mask_cols[None, :], other=0.0)
    elif EVEN_COLS:
        tile = tl.load(ptrs, mask=mask_rows[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=mask_rows[:, None] & mask_cols[None, :], other=0.0)
    return tile


@triton.jit
def store_tile(ptrs, tile, mask_rows, mask_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Stores a 2-D tile, skipping elements past the end (masked only where needed)."""
    if EVEN_ROWS and EVEN_COLS:
        tl.store(ptrs, tile)
    elif EVEN_ROWS:
        tl.store(ptrs, tile, mask=mask_cols[None, :])
    elif EVEN_COLS:
        tl.store(ptrs, tile, mask=mask_rows[:, None])
    else:
        tl.store(ptrs, tile, mask=mask_rows[:, None] & mask_cols[None, :])
