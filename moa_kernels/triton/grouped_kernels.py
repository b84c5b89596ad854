"""The grouped sparse plan's Triton kernels (grouped.py launches them; see its docstring
for the pair plan, and grouped_layout.py for the grouped column space they index).

Kernels (one family; the grid of each is pair tiles, every program owns its outputs, no
atomics; dots in x's dtype with fp32 accumulators, on tensor cores for fp16 / bf16; fp32
with input_precision="ieee"):
  `gathered_shrink_kernel`   grid (tiles,): h_p = x[t_p] A_e^T + b_e (x rows gathered by
                             token index inside the loads, K loop over in), written fp32 to
                             H [N, w_max]; epilogue u_p = act_e(h_p) g s_e (bias column: g,
                             padding: 0) to U [N, w_max] in x's dtype. Also the backward's
                             du_p = dy[t_p] Bt_e^T (dy rows gathered, K loop over out) with
                             epilogue dh_p = du g s act'(h) and dg_p = sum du act(h) s
                             (+ du of the bias column).
  `pair_rows_kernel`         grid (tiles, cdiv(D, BLOCK_N)): P_p = U_p W_e over the expert's
                             w_e rows of a grouped weight W_g [W, D] (forward: Bt_g, D = out;
                             backward dx: A_g, D = in), written [N, D] in x's dtype.
  `combine_kernel`           grid (cdiv(T, BLOCK_T), cdiv(D, BLOCK_N)): out[t] = y[t] +
                             sum_j P[pos[t, j]], j = 0 .. k_max - 1 in expert order, fp32
                             sums rounded once (dx: no y). A skipped pair is in no pos row:
                             it adds exactly nothing, also for a non-finite expert.
  `pair_weight_grad_kernel`  grid (E, S, cdiv(D, BLOCK_N)): split s of expert e's pairs
                             (S a constexpr fixed by T and E, not by the data-dependent
                             N: no new build when N changes; chunks of whole tiles) writes
                             partial[s, o_e + j, :] = sum_p rows_p[j] data[t_p, :] (dA: dh
                             and x; dB: u and dy) and, for dA, the column sums of dh (the
                             down-bias gradient); a split without pairs writes zeros. The
                             second, deterministic pass is partial.sum(0).

FLOPs and bytes (T tokens, N active pairs, k = N / T, in and out features, w the mean
w_e over the pairs, W the grouped width, b bytes per element; the masked dense plan with
K = k_width packed columns, for comparison; weights and [N, w]-sized buffers are small):
  forward   shrink 2 N w in, pair rows 2 N w out FLOPs;
            grouped: b (N in + 2 N out + 2 T out)  x rows once per pair, P [N, out] written
                     and re-read by the combine, y read, out written
            masked:  b (T in + 2 T out) for 2 T K (in + out) FLOPs
  backward  du 2 N w out, dx 2 N w in, dA 2 N w in, dB 2 N w out FLOPs;
            grouped: b (2 N out + 3 N in + T in) + 8 S' W (in + out)  dy rows for du and
                     dB, x rows for dA, dx pair rows written and re-read, dx written; fp32
                     partials of S' splits written and summed
            masked:  b (2 T out + 3 T in) for 4 T K (in + out) FLOPs
So the grouped plan does N w / (T K) of the dense plan's expert FLOPs (top-2 of 8 equal
experts: a quarter) but moves about k times its [T, in] and [T, out] bytes. Time is the
larger of FLOPs / peak and bytes / bandwidth (ridge ~270 FLOP/byte on an H100 or H200).
With in = out = d the dense plan is FLOP-bound only past K ~ 3 b ridge / 4 (~400 packed
columns in bf16), and the grouped plan beats it only where the dense FLOP time passes the
grouped byte time: 4 T K d / F > b T (3 k + 2) d / BW, i.e. K > b (3 k + 2) ridge / 4,
about 1100 packed columns at top-2 in bf16 (8 experts of rank 128 or more; fewer active
pairs per token lower the crossover). For the presets (K ~ 50-200) this model predicts the
masked plan about 2-3x faster in the forward (M8 top-2 at T = 2048, d = 2048, bf16: 25 MB
against 67 MB moved): the GPU suite's layer benchmark measures both (triton rows against
triton-grouped rows), the judge of this model.

Tiles (grouped.py's constants; a GPU run should retune them): BLOCK_M = 64 pairs per tile,
BLOCK_N = 64 columns of out / in, BLOCK_K = 32 for the gathered K loops, BLOCK_R = min(32,
next_pow2(w_max)) rank columns (a dynamic loop over an expert's w_e in BLOCK_R steps; w_e
and o_e carry a multiple-of-16 hint, so masked pair-buffer rows still load 16 bytes at a
time), 32 pairs per K step of the weight gradients. fp32 accumulators of at most [64, 64]
(32 registers per thread at 4 warps). The smaller K and R steps keep the unaligned builds
(odd in / out: scalar gathered loads, one 64-bit address per element) within the budget:
BLOCK_K = 64 and BLOCK_R = 64 made 237-255 registers there, and fp32 (IEEE dots on the FMA
units) takes 32-pair, 32-column tiles. The sm_90 builds (tools/triton_builds.py, as the JIT
specialises them): M8 top-2 and L1's experts under top-2 at T = 2048, 39-127 registers in
bf16 / fp16 / fp32; the odd tiny shapes up to 168 (the pair-rows kernel, at the limit); no
spills; bf16 / fp16 dots on wgmma (the weight gradients' transposed operand: mma).

Activations: `_activation` / `_activation_grad` switch on the expert's code from
moa_kernels.activations' table, taken as constexprs; GROUPED_ACTIVATIONS lists the ones
they evaluate, and grouped_layout.GroupedLayout refuses any other before a launch (the
helpers give NaN, never a silent identity, for a code they do not know).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moa_kernels.activations import GELU, IDENTITY, RELU, SILU

# The activations `_activation` and `_activation_grad` evaluate (codes of the table as
# constexprs); a layout with any other is refused when its GroupedLayout is built.
GROUPED_ACTIVATIONS = (IDENTITY, SILU, GELU, RELU)
_IDENTITY_CODE = tl.constexpr(IDENTITY.code)
_SILU_CODE = tl.constexpr(SILU.code)
_GELU_CODE = tl.constexpr(GELU.code)
_RELU_CODE = tl.constexpr(RELU.code)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _activation(h, code, ANY_ACT: tl.constexpr):
    """act(h) for an expert's activation code (GROUPED_ACTIVATIONS' codes; NaN for any
    other, which GroupedLayout refuses before a launch: never a silent identity)."""
    a = h
    if ANY_ACT:
        if code == _SILU_CODE:
            a = h * tl.sigmoid(h)
        elif code == _GELU_CODE:
            a = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
        elif code == _RELU_CODE:
            a = tl.maximum(h, 0.0)
        elif code != _IDENTITY_CODE:
            a = tl.full(h.shape, float("nan"), tl.float32)
    return a


@triton.jit
def _activation_grad(h, code, ANY_ACT: tl.constexpr):
    """d act(h) / dh (relu: 0 at h = 0, as torch; NaN for an unknown code, as above)."""
    d = tl.full(h.shape, 1.0, tl.float32)
    if ANY_ACT:
        if code == _SILU_CODE:
            sig = tl.sigmoid(h)
            d = sig * (1.0 + h * (1.0 - sig))
        elif code == _GELU_CODE:
            d = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + \
                h * tl.exp(-0.5 * h * h) * 0.3989422804014327
        elif code == _RELU_CODE:
            d = tl.where(h > 0.0, 1.0, 0.0)
        elif code != _IDENTITY_CODE:
            d = tl.full(h.shape, float("nan"), tl.float32)
    return d


@triton.jit
def gathered_shrink_kernel(src_ptr, w_ptr, bias_ptr, gates_ptr, token_ptr, offsets_ptr,
                            tile_expert_ptr, tile_start_ptr, offset_ptr, rank_ptr,
                            width_ptr, has_bias_ptr, act_ptr, scale_ptr, h_ptr, out_ptr,
                            dg_ptr, E, K, stride_src, stride_w, stride_g, stride_h,
                            stride_out, BACKWARD: tl.constexpr, ANY_ACT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                            UPCAST: tl.constexpr):
    """One tile of one expert's pairs: acc = src[t_p] W_e^T (src rows gathered by token,
    W_e the expert's grouped rows of w [W, K]); forward h = acc + b (to h_ptr, fp32) and
    u = act(h) g s / g / 0 (to out_ptr); backward (acc = du) dh = du g s act'(h) (to
    out_ptr) and dg = sum du act(h) s + du_bias (to dg_ptr)."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= E:
        return
    start = tl.load(tile_start_ptr + tile)
    stop = tl.load(offsets_ptr + e + 1)
    column0 = tl.multiple_of(tl.load(offset_ptr + e).to(tl.int64), 16)
    rank = tl.load(rank_ptr + e)
    width = tl.multiple_of(tl.load(width_ptr + e), 16)  # w_e: a multiple of 16
    bias_column = tl.where(tl.load(has_bias_ptr + e) != 0, rank, -1)
    code = tl.load(act_ptr + e)
    scale = tl.load(scale_ptr + e)
    pairs = start + tl.arange(0, BLOCK_M)
    in_pairs = pairs < stop
    tokens = tl.load(token_ptr + pairs, mask=in_pairs, other=0)
    gate = tl.load(gates_ptr + tokens * stride_g + e, mask=in_pairs, other=0.0).to(tl.float32)
    ks = tl.arange(0, BLOCK_K)
    grad_gate = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, width, BLOCK_R):
        cols = r0 + tl.arange(0, BLOCK_R)
        in_cols = cols < width
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            a = tl.load(src_ptr + tokens[:, None] * stride_src + k[None, :],
                        mask=in_pairs[:, None] & (k < K)[None, :], other=0.0)
            b = tl.load(w_ptr + (column0 + cols)[None, :] * stride_w + k[:, None],
                        mask=in_cols[None, :] & (k < K)[:, None], other=0.0)
            acc = _dot(a, b.to(a.dtype), acc, IEEE, UPCAST)
        is_rank = (cols < rank)[None, :]
        is_bias = (cols == bias_column)[None, :]
        keep = in_pairs[:, None] & in_cols[None, :]
        where = pairs[:, None].to(tl.int64) * stride_h + cols[None, :]
        if BACKWARD:
            h = tl.load(h_ptr + where, mask=keep & is_rank, other=0.0)
            act = _activation(h, code, ANY_ACT)
            grad_gate += tl.sum(tl.where(is_rank, acc * act * scale,
                                         tl.where(is_bias, acc, 0.0)), axis=1)
            dh = tl.where(is_rank, acc * gate[:, None] * scale * _activation_grad(h, code,
                                                                                  ANY_ACT),
                          0.0)
            tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :],
                     dh.to(out_ptr.dtype.element_ty), mask=keep)
        else:
            h = acc + tl.load(bias_ptr + column0 + cols, mask=in_cols, other=0.0)[None, :]
            tl.store(h_ptr + where, h, mask=keep)
            act = _activation(h, code, ANY_ACT)
            u = tl.where(is_rank, act * gate[:, None] * scale,
                         tl.where(is_bias, gate[:, None], 0.0))
            tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :],
                     u.to(out_ptr.dtype.element_ty), mask=keep)
    if BACKWARD:
        tl.store(dg_ptr + pairs, grad_gate, mask=in_pairs)


@triton.jit
def pair_rows_kernel(rows_ptr, w_ptr, out_ptr, offsets_ptr, tile_expert_ptr,
                      tile_start_ptr, offset_ptr, width_ptr, E, D, stride_rows, stride_w,
                      stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_R: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """out[p, n] = sum_j rows[p, j] w[o_e + j, n] over the expert's w_e columns."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= E:
        return
    start = tl.load(tile_start_ptr + tile)
    stop = tl.load(offsets_ptr + e + 1)
    column0 = tl.multiple_of(tl.load(offset_ptr + e).to(tl.int64), 16)
    width = tl.multiple_of(tl.load(width_ptr + e), 16)  # w_e: a multiple of 16
    pairs = start + tl.arange(0, BLOCK_M)
    in_pairs = pairs < stop
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, width, BLOCK_R):
        cols = r0 + tl.arange(0, BLOCK_R)
        in_cols = cols < width
        a = tl.load(rows_ptr + pairs[:, None].to(tl.int64) * stride_rows + cols[None, :],
                    mask=in_pairs[:, None] & in_cols[None, :], other=0.0)
        b = tl.load(w_ptr + (column0 + cols)[:, None] * stride_w + n[None, :],
                    mask=in_cols[:, None] & in_n[None, :], other=0.0)
        acc = _dot(a, b.to(a.dtype), acc, IEEE, UPCAST)
    tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_out + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=in_pairs[:, None] & in_n[None, :])


@triton.jit
def combine_kernel(rows_ptr, pos_ptr, y_ptr, out_ptr, T, D, K_MAX, stride_rows, stride_pos,
                    stride_y, stride_out, HAS_BASE: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """out[t, n] = y[t, n] + sum_{j < K_MAX} rows[pos[t, j], n] (pos < 0: nothing), summed
    in fp32 in the order of j."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < T
    t = t.to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < D
    keep = in_t[:, None] & in_n[None, :]
    if HAS_BASE:
        acc = tl.load(y_ptr + t[:, None] * stride_y + n[None, :], mask=keep,
                      other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, K_MAX):
        pair = tl.load(pos_ptr + t * stride_pos + j, mask=in_t, other=-1)
        row = tl.load(rows_ptr + pair[:, None] * stride_rows + n[None, :],
                      mask=keep & (pair >= 0)[:, None], other=0.0)
        acc += row.to(tl.float32)
    tl.store(out_ptr + t[:, None] * stride_out + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def pair_weight_grad_kernel(rows_ptr, data_ptr, partial_ptr, partial_bias_ptr, token_ptr,
                             offsets_ptr, offset_ptr, width_ptr, D, stride_rows, stride_data,
                             stride_ps, stride_pw, stride_bs, SPLITS: tl.constexpr,
                             WITH_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                             IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """partial[s, o_e + j, n] = sum over split s of expert e's pairs of rows[p, j]
    data[t_p, n] (and partial_bias[s, o_e + j] = sum rows[p, j] in the programs of the
    first column block)."""
    e = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    chunk = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_M) * BLOCK_M
    start = lo + split * chunk
    stop = tl.minimum(start + chunk, hi)
    column0 = tl.multiple_of(tl.load(offset_ptr + e).to(tl.int64), 16)
    width = tl.multiple_of(tl.load(width_ptr + e), 16)  # w_e: a multiple of 16
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < D
    ms = tl.arange(0, BLOCK_M)
    for r0 in range(0, width, BLOCK_R):
        cols = r0 + tl.arange(0, BLOCK_R)
        in_cols = cols < width
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        bias = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for m0 in range(start, stop, BLOCK_M):
            pairs = m0 + ms
            in_pairs = pairs < stop
            tokens = tl.load(token_ptr + pairs, mask=in_pairs, other=0)
            a = tl.load(rows_ptr + pairs[:, None].to(tl.int64) * stride_rows + cols[None, :],
                        mask=in_pairs[:, None] & in_cols[None, :], other=0.0)
            b = tl.load(data_ptr + tokens[:, None] * stride_data + n[None, :],
                        mask=in_pairs[:, None] & in_n[None, :], other=0.0)
            acc = _dot(tl.trans(a), b.to(a.dtype), acc, IEEE, UPCAST)
            if WITH_BIAS:
                bias += tl.sum(a.to(tl.float32), axis=0)
        tl.store(partial_ptr + split * stride_ps + (column0 + cols)[:, None] * stride_pw +
                 n[None, :], acc, mask=in_cols[:, None] & in_n[None, :])
        if WITH_BIAS:
            if tl.program_id(2) == 0:
                tl.store(partial_bias_ptr + split * stride_bs + column0 + cols, bias,
                         mask=in_cols)
