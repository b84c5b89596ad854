"""Grouped sparse plan: the sparse modes as grouped GEMMs over the active (token, expert)
pairs sorted by expert, chosen with MOA_TRITON_SPARSE=grouped (the default, "masked", runs
the dense GEMMs of expand.py with the inactive pairs masked).

Pair plan (`PairPlan.of(active)`, torch ops): the N active pairs sorted by expert, then by
token (stable: `nonzero` of active^T is row-major); token_index [N], pair_flat [N]
(t * E + e: where a pair's gate gradient goes), offsets [E + 1] (expert e's pairs are
[offsets[e], offsets[e + 1])), and pos [T, k_max] (the pairs of each token in expert order,
-1 past its count: the combine's fixed order). Tiles of BLOCK_M pairs never straddle two
experts (`_tiles`: at most cdiv(N, BLOCK_M) + E tiles, found on the device from the
offsets). Building it reads N and k_max on the host: two host syncs per forward (the
nonzero, and k_max read by int()); the backward reuses the plan and syncs nothing.

Grouped column space (`GroupedLayout`): expert e owns the columns [o_e, o_e + w_e),
w_e = align16(r_e + b_e): its r_e rank columns (lora / hydra: A rows and B columns, a hydra
head with its own copy of the shared A rows; adapter: W_down rows and W_up columns), then,
for an adapter (b_e = 1), its up-bias as a column read by u = g, then zeros. Packed weights
(cached per parameter version, plan.packed): A_g [W, in] and Bt_g [W, out] (B transposed:
rows contiguous along out), b_g [W] fp32 (the down biases). The pair buffers are
[N, w_max] with pair p's row holding its expert's w_e columns.

Kernels (one family; the grid of each is pair tiles, every program owns its outputs, no
atomics; dots in x's dtype with fp32 accumulators, on tensor cores for fp16 / bf16; fp32
with input_precision="ieee"):
  `_gathered_shrink_kernel`  grid (tiles,): h_p = x[t_p] A_e^T + b_e (x rows gathered by
                             token index inside the loads, K loop over in), written fp32 to
                             H [N, w_max]; epilogue u_p = act_e(h_p) g s_e (bias column: g,
                             padding: 0) to U [N, w_max] in x's dtype. Also the backward's
                             du_p = dy[t_p] Bt_e^T (dy rows gathered, K loop over out) with
                             epilogue dh_p = du g s act'(h) and dg_p = sum du act(h) s
                             (+ du of the bias column).
  `_pair_rows_kernel`        grid (tiles, cdiv(D, BLOCK_N)): P_p = U_p W_e over the expert's
                             w_e rows of a grouped weight W_g [W, D] (forward: Bt_g, D = out;
                             backward dx: A_g, D = in), written [N, D] in x's dtype.
  `_combine_kernel`          grid (cdiv(T, BLOCK_T), cdiv(D, BLOCK_N)): out[t] = y[t] +
                             sum_j P[pos[t, j]], j = 0 .. k_max - 1 in expert order, fp32
                             sums rounded once (dx: no y). A skipped pair is in no pos row:
                             it adds exactly nothing, also for a non-finite expert.
  `_pair_weight_grad_kernel` grid (E, S, cdiv(D, BLOCK_N)): split s of expert e's pairs
                             (S a constexpr fixed by T and E, not by the data-dependent
                             N: no new build when N changes; chunks of whole tiles) writes
                             partial[s, o_e + j, :] = sum_p rows_p[j] data[t_p, :] (dA: dh
                             and x; dB: u and dy) and, for dA, the column sums of dh (the
                             down-bias gradient); a split without pairs writes zeros. The
                             second, deterministic pass is partial.sum(0).
Backward: du/dh/dg (gathered shrink of dy), dx = combine(dh A_g) (pair rows, then combine),
dA_g, db_g (weight-grad of dh and x), dBt_g (weight-grad of u and dy); dg scattered into
[T, E] at unique positions (index_put_, deterministic). Unpacking to the layout's stacked
gradients: hydra heads' rows summed in a fixed order, like plan.unpack_shrink_rows.

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

Tiles (a GPU run should retune them): BLOCK_M = 64 pairs per tile, BLOCK_N = 64 columns of
out / in, BLOCK_K = 32 for the gathered K loops, BLOCK_R = min(32, next_pow2(w_max)) rank
columns (a dynamic loop over an expert's w_e in BLOCK_R steps; w_e and o_e carry a
multiple-of-16 hint, so masked pair-buffer rows still load 16 bytes at a time), 32 pairs per
K step of the weight gradients. fp32 accumulators of at most [64, 64] (32 registers per
thread at 4 warps). The smaller K and R steps keep the unaligned builds (odd in / out:
scalar gathered loads, one 64-bit address per element) within the budget: BLOCK_K = 64 and
BLOCK_R = 64 made 237-255 registers there, and fp32 (IEEE dots on the FMA units) takes
32-pair, 32-column tiles. The sm_90 builds (tools/triton_builds.py, as the JIT specialises them): M8
top-2 and L1's experts under top-2 at T = 2048, 39-127 registers in bf16 / fp16 / fp32;
the odd tiny shapes up to 168 (the pair-rows kernel, at the limit); no spills; bf16 / fp16
dots on wgmma (the weight gradients' transposed operand: mma).

torch.compile: the ops are torch.library custom ops (moa::grouped_mixture and its
backward, ops.py) whose fake implementations give the pair buffers data-dependent sizes
(ctx.new_dynamic_size()), so a model traces with fullgraph=True (tested with aot_eager;
inductor ran once by hand on the CPU). The plan itself is meant for eager runs on a GPU:
its two host syncs stay inside the op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moa_kernels.activations import GELU, IDENTITY, RELU, SILU, activation_by_code
from moa_kernels.triton.kernel_utils import align16
from moa_kernels.triton.plan import LayoutCode, cached_layout, packed

SPARSE_PLANS = ("masked", "grouped")
SPARSE_PLAN_VARIABLE = "MOA_TRITON_SPARSE"

BLOCK_M = 64  # pairs per tile
BLOCK_N = 64  # columns of out / in per program (pair rows, combine, weight gradients)
BLOCK_K = 32  # K step of the gathered shrink loops
BLOCK_T = 32  # tokens per combine program
MAX_BLOCK_R = 32  # rank columns per step (see the module docstring)
GRAD_BLOCK_M = 32  # pairs per K step of the weight-gradient dots
PAIRS_PER_SPLIT = 512  # weight gradients: about this many pairs per split of an expert
MAX_SPLITS = 16


def sparse_plan() -> str:
    """The sparse kernel plan chosen by MOA_TRITON_SPARSE ("masked", the default, or
    "grouped"), read at call time (under torch.compile: at trace time, a constant)."""
    value = os.environ.get(SPARSE_PLAN_VARIABLE, "masked") or "masked"
    if value not in SPARSE_PLANS:
        raise ValueError(f"{SPARSE_PLAN_VARIABLE}={value!r}: allowed values are "
                         f"{', '.join(repr(p) for p in SPARSE_PLANS)}")
    return value


# The activations `_activation` and `_activation_grad` evaluate (codes of the table as
# constexprs); a layout with any other is refused when its GroupedLayout is built.
GROUPED_ACTIVATIONS = (IDENTITY, SILU, GELU, RELU)
_IDENTITY_CODE = tl.constexpr(IDENTITY.code)
_SILU_CODE = tl.constexpr(SILU.code)
_GELU_CODE = tl.constexpr(GELU.code)
_RELU_CODE = tl.constexpr(RELU.code)
_NAN = tl.constexpr(float("nan"))

# every buffer a kernel writes is allocated by this (tests pre-fill them with NaN: an
# element a kernel forgets to write, and then reads or returns, shows)
_empty = torch.empty


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------
# the grouped column space
# ---------------------------------------------------------------------------------------

def grouped_widths(code: list[int]) -> dict[str, int]:
    """Sizes of a layout code's grouped space (plain ints, for fake implementations):
    experts E, total width W, the widest expert w_max."""
    slots = LayoutCode.decode(code).slots
    widths = [align16(slot.rank + slot.has_bias) for slot in slots]
    return {"experts": len(slots), "width": sum(widths), "w_max": max(widths, default=16)}


@dataclass
class GroupedLayout:
    """The grouped column space of one layout on one device (see the module docstring).

    Ints: num_experts, width W, w_max, rows R, columns C, adapters, any_activation.
    Device tables [E]: offset, rank, width, has_bias (int32), activation (int32 codes of
    moa_kernels.activations; only those of GROUPED_ACTIVATIONS), scale (fp32).
    Index tables: rank_columns [n] (the grouped columns holding a rank column), their
    shrink_rows [n] and expand_columns [n] in the stacked tensors; bias_columns [N_ad]
    (the grouped column of adapter a's up-bias); row_first [R] (the first grouped column
    reading shrink row r), column_of [C] (the grouped column of expand column c);
    extra_readers: (shrink row, grouped column, rank) of every hydra head after a group's
    first.
    """

    num_experts: int
    width: int
    w_max: int
    rows: int
    columns: int
    adapters: int
    any_activation: bool
    offset: torch.Tensor
    rank: torch.Tensor
    widths: torch.Tensor
    has_bias: torch.Tensor
    activation: torch.Tensor
    scale: torch.Tensor
    rank_columns: torch.Tensor
    shrink_rows: torch.Tensor
    expand_columns: torch.Tensor
    bias_columns: torch.Tensor
    row_first: torch.Tensor
    column_of: torch.Tensor
    extra_readers: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, code: list[int], scales: list[float], device: torch.device) -> GroupedLayout:
        """The grouped space of a LayoutCode's ints on `device` (cached); ValueError for an
        activation the kernels do not evaluate (not in GROUPED_ACTIVATIONS)."""
        return cached_layout(_GROUPED, cls._build, code, scales, device)

    @classmethod
    def _build(cls, code, scales, device) -> GroupedLayout:
        layout = LayoutCode.decode(code)
        rows, columns, adapters = layout.rows, layout.columns, layout.adapters
        slots = layout.slots
        offset, rank, widths, has_bias, activation = [], [], [], [], []
        rank_columns, shrink_rows, expand_columns = [], [], []
        bias_columns = [0] * adapters
        row_first, column_of = [-1] * rows, [0] * columns
        extra, seen_rows = [], set()
        start = 0
        for slot in slots:
            s0, s1, c0, r, adapter = slot.shrink_start, slot.shrink_stop, slot.expand_start, \
                slot.rank, slot.adapter
            if activation_by_code(slot.activation) not in GROUPED_ACTIVATIONS:
                raise ValueError(
                    f"the grouped kernels have no {activation_by_code(slot.activation).name!r}"
                    f" activation; they have {', '.join(a.name for a in GROUPED_ACTIVATIONS)}")
            w = align16(r + slot.has_bias)
            offset.append(start)
            rank.append(r)
            widths.append(w)
            has_bias.append(int(slot.has_bias))
            activation.append(slot.activation)
            for j in range(r):
                rank_columns.append(start + j)
                shrink_rows.append(s0 + j)
                expand_columns.append(c0 + j)
                column_of[c0 + j] = start + j
                if row_first[s0 + j] < 0:
                    row_first[s0 + j] = start + j
            if (s0, s1) in seen_rows:
                extra.append((s0, start, r))
            seen_rows.add((s0, s1))
            if adapter >= 0:
                bias_columns[adapter] = start + r
            start += w

        def table(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(len(slots), start, max(widths, default=16), rows, columns, adapters,
                   any(a != IDENTITY.code for a in activation),
                   table(offset, torch.int32), table(rank, torch.int32),
                   table(widths, torch.int32), table(has_bias, torch.int32),
                   table(activation, torch.int32), table(scales, torch.float32),
                   table(rank_columns, torch.int64), table(shrink_rows, torch.int64),
                   table(expand_columns, torch.int64), table(bias_columns, torch.int64),
                   table(row_first, torch.int64), table(column_of, torch.int64),
                   tuple(extra))

    # packed weights (cached per parameter version)

    def pack_shrink(self, shrink_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A_g [W, in] in `dtype`."""
        def build():
            result = shrink_weight.new_zeros(self.width, shrink_weight.shape[1], dtype=dtype)
            result[self.rank_columns] = shrink_weight.index_select(0, self.shrink_rows).to(
                dtype)
            return result

        return packed("grouped shrink", (shrink_weight,), (dtype, id(self)), build)

    def pack_bias(self, full_bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """b_g [W] fp32 (zeros without a bias: small, built per call)."""
        result = like.new_zeros(self.width, dtype=torch.float32)
        if full_bias is not None:
            result[self.rank_columns] = full_bias.index_select(0, self.shrink_rows).float()
        return result

    def pack_expand(self, expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
        """Bt_g [W, out] in `dtype`: expert columns of B as rows, the up-biases as rows."""
        def build():
            result = expand_weight.new_zeros(self.width, expand_weight.shape[0], dtype=dtype)
            result[self.rank_columns] = expand_weight.t().index_select(
                0, self.expand_columns).to(dtype)
            if self.adapters:
                result[self.bias_columns] = expand_bias.to(dtype)
            return result

        sources = (expand_weight, expand_bias) if self.adapters else (expand_weight,)
        return packed("grouped expand", sources, (dtype, id(self)), build)

    # gradients back to the stacked tensors (fixed-order sums: deterministic)

    def unpack_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """d of the shrink rows [R, ...] from d of the grouped rows [W, ...]."""
        result = grad.index_select(0, self.row_first)
        for row, column, rank in self.extra_readers:
            result[row:row + rank] += grad[column:column + rank]
        return result

    def unpack_expand(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d expand_weight [out, C], d expand_bias [N_ad, out]) from d Bt_g [W, out]."""
        weight = grad.index_select(0, self.column_of).t().contiguous()
        bias = grad.index_select(0, self.bias_columns) if self.adapters else \
            grad.new_empty(0, grad.shape[1])
        return weight, bias


_GROUPED: dict[tuple, GroupedLayout] = {}


# ---------------------------------------------------------------------------------------
# the pair plan
# ---------------------------------------------------------------------------------------

@dataclass
class PairPlan:
    """The active pairs sorted by expert, then token (see the module docstring)."""

    token_index: torch.Tensor  # [N] int64
    pair_flat: torch.Tensor  # [N] int64: t * E + e
    offsets: torch.Tensor  # [E + 1] int64
    pos: torch.Tensor  # [T, k_max] int64, -1 past a token's count

    @classmethod
    def of(cls, active: torch.Tensor) -> PairPlan:
        """From active [T, E] bool."""
        tokens, experts = active.shape
        counts = active.sum(0)
        per_token = active.sum(1)
        k_max = int(per_token.max()) if tokens else 0
        pairs = active.t().nonzero()  # (expert, token), row-major: by expert, then token
        token_index = pairs[:, 1].contiguous()
        offsets = torch.zeros(experts + 1, dtype=torch.int64, device=active.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        # pair index of (t, e): offsets[e] + (active tokens of e before t)
        pair_id = offsets[:-1][None, :] + active.cumsum(0) - 1
        key = torch.where(active, torch.arange(experts, device=active.device), experts)
        order = torch.sort(key, dim=1, stable=True).indices[:, :k_max]
        chosen = pair_id.gather(1, order)
        pos = torch.where(active.gather(1, order), chosen, -1).contiguous()
        return cls(token_index, token_index * experts + pairs[:, 0], offsets, pos)


def _tiles(offsets: torch.Tensor, pairs: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_expert [n] int32, tile_start [n] int64) for n = cdiv(pairs, block) + E tiles:
    each tile holds up to `block` pairs of one expert; unused tiles get expert E (their
    programs return at once). On the device, from the offsets (no host sync)."""
    experts = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    per_expert = (counts + block - 1) // block
    last = torch.cumsum(per_expert, 0)
    ids = torch.arange(triton.cdiv(pairs, block) + experts, device=offsets.device)
    expert = torch.searchsorted(last, ids, right=True)
    clamped = expert.clamp(max=experts - 1)
    start = offsets[clamped] + (ids - (last[clamped] - per_expert[clamped])) * block
    return expert.to(torch.int32), start


def _block_m(dtype: torch.dtype) -> int:
    """Pairs per tile: 32 in fp32 (its IEEE dots run on the FMA units with operands in
    registers: 64 spilled in the unaligned builds), else BLOCK_M."""
    return 32 if dtype == torch.float32 else BLOCK_M


def _block_n(dtype: torch.dtype) -> int:
    """Columns of out / in per program of the dot kernels: 32 in fp32 (as _block_m), else
    BLOCK_N (the combine, elementwise, keeps BLOCK_N)."""
    return 32 if dtype == torch.float32 else BLOCK_N


def _splits(pairs: int, experts: int) -> int:
    return max(1, min(MAX_SPLITS, triton.cdiv(pairs, experts * PAIRS_PER_SPLIT)))


def _weight_grad_splits(tokens: int, experts: int) -> int:
    """The splits per expert of the weight gradients (the SPLITS constexpr): those of the
    largest pair count T x E, a fixed function of the call's static sizes. Taken from the
    active pair count, it would change with the routing and compile a new kernel at each
    new value during training; an expert has at most T pairs, so chunks of about
    PAIRS_PER_SPLIT pairs each are what the busiest expert can need."""
    return _splits(tokens * experts, experts)


def _block_r(meta: GroupedLayout) -> int:
    return max(16, min(MAX_BLOCK_R, triton.next_power_of_2(meta.w_max)))


def _dot_options(dtype: torch.dtype) -> dict:
    """fp32: IEEE dots (no TF32); bf16 under the interpreter: fp32 dots (triton 3.9's
    interpreter computes bf16 dots wrongly; compiled kernels use bf16 tensor cores)."""
    return {"IEEE": dtype == torch.float32,
            "UPCAST": dtype == torch.bfloat16 and _interpreted()}


# ---------------------------------------------------------------------------------------
# forward and backward
# ---------------------------------------------------------------------------------------

def grouped_forward(y: torch.Tensor, x: torch.Tensor, gates: torch.Tensor, active: torch.Tensor,
                    shrink_weight: torch.Tensor, full_bias: torch.Tensor | None,
                    expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                    meta: GroupedLayout) -> tuple[torch.Tensor, ...]:
    """out = y + sum over active pairs of g_e delta_e(x).

    Args: y [T, out] (x's dtype), x [T, in] the adapters' input, gates [T, E], active
    [T, E] bool, the stacked expert tensors (any float dtype: packed in x's dtype) and
    full_bias [R] or None.
    Returns out [T, out] (new), and for the backward: token_index, pair_flat, offsets,
    pos (the PairPlan), H [N, w_max] fp32, U [N, w_max] in x's dtype.
    """
    plan = PairPlan.of(active)
    pairs = plan.token_index.numel()
    dtype = x.dtype
    h = _empty(pairs, meta.w_max, device=x.device, dtype=torch.float32)
    u = _empty(pairs, meta.w_max, device=x.device, dtype=dtype)
    if pairs == 0:
        return (y.clone(), plan.token_index, plan.pair_flat, plan.offsets, plan.pos, h, u)
    a_g = meta.pack_shrink(shrink_weight, dtype)
    b_g = meta.pack_bias(full_bias, x)
    bt_g = meta.pack_expand(expand_weight, expand_bias, dtype)
    tile_expert, tile_start = _tiles(plan.offsets, pairs, _block_m(dtype))
    gates = gates.contiguous()
    _launch_gathered(meta, tile_expert, tile_start, plan, x, a_g, b_g, gates, h, u, None)
    rows = _pair_rows(meta, tile_expert, tile_start, plan, u, bt_g)
    out = _combine(plan, rows, y)
    return out, plan.token_index, plan.pair_flat, plan.offsets, plan.pos, h, u


def grouped_backward(grad: torch.Tensor, x: torch.Tensor, gates: torch.Tensor,
                     token_index: torch.Tensor, pair_flat: torch.Tensor,
                     offsets: torch.Tensor, pos: torch.Tensor, h: torch.Tensor,
                     u: torch.Tensor, shrink_weight: torch.Tensor,
                     expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                     meta: GroupedLayout, need: list[bool]) -> list[torch.Tensor | None]:
    """Gradients of grouped_forward's out from grad [T, out] (y's gradient is grad itself).

    need: which of (x, gates, shrink_weight, full_bias, expand_weight, expand_bias) need a
    gradient. Returns them in that order (None where not needed): dx in x's dtype, d gates
    [T, E] fp32 (0 on inactive pairs), the weights' in their tensors' dtypes, the bias's
    fp32.
    """
    need_x, need_g, need_w, need_b, need_ew, need_eb = need
    plan = PairPlan(token_index, pair_flat, offsets, pos)
    tokens, pairs, dtype = x.shape[0], token_index.numel(), x.dtype
    result: list[torch.Tensor | None] = [None] * 6
    grad = grad.to(dtype).contiguous()
    if pairs == 0:
        zeros = [x.new_zeros(x.shape), gates.new_zeros(gates.shape, dtype=torch.float32),
                 torch.zeros_like(shrink_weight), x.new_zeros(meta.rows, dtype=torch.float32),
                 torch.zeros_like(expand_weight), torch.zeros_like(expand_bias)]
        return [z if n else None for z, n in zip(zeros, need)]
    tile_expert, tile_start = _tiles(offsets, pairs, _block_m(dtype))
    bt_g = meta.pack_expand(expand_weight, expand_bias, dtype)
    dh = _empty(pairs, meta.w_max, device=x.device, dtype=dtype)
    dg_pairs = _empty(pairs, device=x.device, dtype=torch.float32)
    _launch_gathered(meta, tile_expert, tile_start, plan, grad, bt_g, None, gates, h, dh,
                     dg_pairs)
    if need_g:
        dg = torch.zeros(tokens * meta.num_experts, device=x.device, dtype=torch.float32)
        dg[pair_flat] = dg_pairs  # unique positions: deterministic
        result[1] = dg.view(tokens, meta.num_experts)
    if need_x:
        a_g = meta.pack_shrink(shrink_weight, dtype)
        rows = _pair_rows(meta, tile_expert, tile_start, plan, dh, a_g)
        result[0] = _combine(plan, rows, None)
    if need_w or need_b:
        grad_a, grad_b = _weight_grad(meta, plan, dh, x, with_bias=True)
        if need_w:
            result[2] = meta.unpack_rows(grad_a).to(shrink_weight.dtype)
        if need_b:
            result[3] = meta.unpack_rows(grad_b)
    if need_ew or need_eb:
        grad_bt, _ = _weight_grad(meta, plan, u, grad, with_bias=False)
        weight, bias = meta.unpack_expand(grad_bt)
        result[4] = weight.to(expand_weight.dtype) if need_ew else None
        result[5] = bias.to(expand_bias.dtype) if need_eb else None
    return result


def _launch_gathered(meta, tile_expert, tile_start, plan, source, weight, bias, gates, h,
                     target, dg_pairs):
    """Forward (dg_pairs None): h, u from x rows. Backward: dh, dg from dy rows."""
    backward = dg_pairs is not None
    width = source.shape[1]
    _gathered_shrink_kernel[(tile_expert.numel(),)](
        source, weight, bias if bias is not None else h, gates, plan.token_index,
        plan.offsets, tile_expert, tile_start, meta.offset, meta.rank, meta.widths,
        meta.has_bias, meta.activation, meta.scale, h, target,
        dg_pairs if backward else h, meta.num_experts, width, source.stride(0),
        weight.stride(0), gates.stride(0), h.stride(0), target.stride(0),
        BACKWARD=backward, ANY_ACT=meta.any_activation, BLOCK_M=_block_m(source.dtype),
        BLOCK_K=BLOCK_K,
        BLOCK_R=_block_r(meta), **_dot_options(source.dtype))


def _pair_rows(meta, tile_expert, tile_start, plan, rows, weight) -> torch.Tensor:
    """P [N, D] = rows_p W_e over each pair's expert rows of weight [W, D]."""
    pairs, columns = rows.shape[0], weight.shape[1]
    out = _empty(pairs, columns, device=rows.device, dtype=rows.dtype)
    block_n = _block_n(rows.dtype)
    grid = (tile_expert.numel(), triton.cdiv(columns, block_n))
    _pair_rows_kernel[grid](
        rows, weight, out, plan.offsets, tile_expert, tile_start, meta.offset, meta.widths,
        meta.num_experts, columns, rows.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=_block_m(rows.dtype), BLOCK_N=block_n, BLOCK_R=_block_r(meta),
        **_dot_options(rows.dtype))
    return out


def _combine(plan: PairPlan, rows: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """out[t] = y[t] (or 0) + sum_j rows[pos[t, j]], in rows' dtype."""
    tokens, k_max = plan.pos.shape
    columns = rows.shape[1]
    out = _empty(tokens, columns, device=rows.device, dtype=rows.dtype)
    if tokens:
        grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(columns, BLOCK_N))
        _combine_kernel[grid](
            rows, plan.pos, y if y is not None else out, out, tokens, columns, k_max,
            rows.stride(0), plan.pos.stride(0), y.stride(0) if y is not None else 0,
            out.stride(0), HAS_BASE=y is not None, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N)
    return out


def _weight_grad(meta, plan, rows, data, *, with_bias: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over each expert's pairs of rows_p^T data[t_p] [W, D] fp32, and with_bias the
    column sums of rows [W] fp32): split partials, then a fixed-order sum."""
    columns = data.shape[1]
    splits = _weight_grad_splits(data.shape[0], meta.num_experts)
    partial = _empty(splits, meta.width, columns, device=rows.device,
                          dtype=torch.float32)
    partial_bias = _empty(splits, meta.width, device=rows.device, dtype=torch.float32) \
        if with_bias else partial
    block_n = _block_n(rows.dtype)
    grid = (meta.num_experts, splits, triton.cdiv(columns, block_n))
    _pair_weight_grad_kernel[grid](
        rows, data, partial, partial_bias, plan.token_index, plan.offsets, meta.offset,
        meta.widths, columns, rows.stride(0), data.stride(0), partial.stride(0),
        partial.stride(1), partial_bias.stride(0), SPLITS=splits, WITH_BIAS=with_bias,
        BLOCK_M=GRAD_BLOCK_M, BLOCK_N=block_n, BLOCK_R=_block_r(meta),
        **_dot_options(rows.dtype))
    return partial.sum(0), partial_bias.sum(0) if with_bias else None


# ---------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------

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
            a = tl.full(h.shape, _NAN, tl.float32)
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
            d = tl.full(h.shape, _NAN, tl.float32)
    return d


@triton.jit
def _gathered_shrink_kernel(src_ptr, w_ptr, bias_ptr, gates_ptr, token_ptr, offsets_ptr,
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
def _pair_rows_kernel(rows_ptr, w_ptr, out_ptr, offsets_ptr, tile_expert_ptr,
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
def _combine_kernel(rows_ptr, pos_ptr, y_ptr, out_ptr, T, D, K_MAX, stride_rows, stride_pos,
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
def _pair_weight_grad_kernel(rows_ptr, data_ptr, partial_ptr, partial_bias_ptr, token_ptr,
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
