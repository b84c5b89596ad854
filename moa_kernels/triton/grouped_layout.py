"""The grouped sparse plan's column space: where each expert's rank (and up-bias) columns
live in the grouped weights and the per-pair buffers, as device tables, and the grouped
weights packed from (and gradients unpacked to) the layout's stacked tensors.

Grouped column space (`GroupedLayout`): expert e owns the columns [o_e, o_e + w_e),
w_e = align16(r_e + b_e): its r_e rank columns (lora / hydra: A rows and B columns, a hydra
head with its own copy of the shared A rows; adapter: W_down rows and W_up columns), then,
for an adapter (b_e = 1), its up-bias as a column read by u = g, then zeros. Packed weights
(cached per parameter version, plan.packed): A_g [W, in] and Bt_g [W, out] (B transposed:
rows contiguous along out), b_g [W] fp32 (the down biases). The pair buffers are
[N, w_max] with pair p's row holding its expert's w_e columns.
Built from a plan.LayoutCode's ints (`GroupedLayout.of(code, scales, device)`, cached per
distinct layout and device); `grouped_widths(code)` gives its sizes as plain ints (for the
custom op's fake implementation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moa_kernels.activations import IDENTITY, activation_by_code
from moa_kernels.triton.grouped_kernels import GROUPED_ACTIVATIONS
from moa_kernels.triton.kernel_utils import align16
from moa_kernels.triton.plan import LayoutCode, cached_layout, packed


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
