"""Kernel metadata: a layout's packed column space, and the packed weights, cached per
parameter version.

The expand GEMM's inner dimension is the packed column space K of one layer:

    K columns [0, C)          the C expert columns of expand_weight (hydra: one block per
                              head), ordered identity | silu | gelu | relu (stable within
                              each class), so each activation covers one column range
                              known when the kernel is compiled
    K columns [C, C + N_ad)   one per adapter: its up-bias b_up as a column of B, read by
                              u = g (the bias joins the expand GEMM instead of a pass of
                              its own)
    K columns up to k_width   zero padding to a multiple of 16 (16-byte aligned rows of
                              the packed B and of u: vectorised loads, tensor-core K)

The shrink writes h in the same order: h column c < C is the pre-activation that K column c
reads (hydra heads duplicate their shared A rows: the shrink is bound by reading x, so
the extra rows cost no time, and every expand load is a contiguous row segment), then zero
padding to h_width = ceil16(C), then the router's first layer (when fused).

The layout code: `LayoutCode.encode(layout)` is the layout as one typed object of plain ints
(rows R, columns C, adapters N_ad, and per slot a `SlotCode`: kind and activation codes of
the tables in moa_kernels.layout and moa_kernels.activations, shrink rows, expand columns,
adapter index); `to_ints()` flattens it into the int list the custom ops take (a constant
under torch.compile) and `LayoutCode.decode(ints)`, the one place that reads that list,
gives the object back (and raises on a code the tables do not know). `layout_code(layout)`
gives both op arguments: the ints and the slots' scalings.
`KernelLayout.of(code, scales, device)`, called inside the ops, holds the map as small
device tables and ints (cached per distinct layout and device).
`packed(kind, sources, extra, build)` caches a packed weight per version of its source
tensors (weak references: an entry dies with its tensor, and an in-place update, e.g. the
optimizer step, bumps the version and re-packs), so a steady training or decoding loop
packs nothing per call.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moa_kernels.activations import activation_by_code, activation_by_name
from moa_kernels.layout import EXPERT_KINDS, ExpertLayout, kind_code, kind_of_code
from moa_kernels.triton.kernel_utils import COLUMN_ORDER, align16


@dataclass(frozen=True)
class SlotCode:
    """One slot (gated expert) of a layout code, as plain ints."""

    kind: int  # moa_kernels.layout.EXPERT_KINDS code
    shrink_start: int  # its shrink rows [shrink_start, shrink_stop)
    shrink_stop: int
    expand_start: int  # its expand columns [expand_start, expand_stop)
    expand_stop: int
    activation: int  # moa_kernels.activations code
    adapter: int  # its row of expand_bias, -1 for lora / hydra

    @property
    def rank(self) -> int:
        return self.expand_stop - self.expand_start

    @property
    def has_bias(self) -> bool:
        return self.adapter >= 0


_SLOT_FIELDS = len(SlotCode.__dataclass_fields__)
_HEADER = 3  # rows, columns, adapters


@dataclass(frozen=True)
class LayoutCode:
    """A layout as plain ints (see the module docstring): rows R, columns C, adapters N_ad
    and one SlotCode per slot."""

    rows: int
    columns: int
    adapters: int
    slots: tuple[SlotCode, ...]

    @classmethod
    def encode(cls, layout: ExpertLayout) -> LayoutCode:
        return cls(layout.shrink_rows, layout.expand_columns, layout.num_adapters, tuple(
            SlotCode(kind_code(slot.kind), *slot.shrink, *slot.expand,
                     activation_by_name(slot.activation).code,
                     -1 if slot.adapter_index is None else slot.adapter_index)
            for slot in layout.slots))

    def to_ints(self) -> list[int]:
        """[R, C, N_ad] + the 7 fields of each slot, in SlotCode's field order."""
        ints = [self.rows, self.columns, self.adapters]
        for slot in self.slots:
            ints += [slot.kind, slot.shrink_start, slot.shrink_stop, slot.expand_start,
                     slot.expand_stop, slot.activation, slot.adapter]
        return ints

    @classmethod
    def decode(cls, ints: list[int] | tuple[int, ...]) -> LayoutCode:
        """The LayoutCode that `to_ints` flattened; ValueError for a list of another length
        or with a kind or activation code the tables do not know."""
        ints = tuple(int(i) for i in ints)
        if len(ints) < _HEADER or (len(ints) - _HEADER) % _SLOT_FIELDS:
            raise ValueError(f"a layout code has {_HEADER} + {_SLOT_FIELDS} x experts ints, "
                             f"got {len(ints)}")
        slots = tuple(SlotCode(*ints[i:i + _SLOT_FIELDS])
                      for i in range(_HEADER, len(ints), _SLOT_FIELDS))
        for slot in slots:
            kind_of_code(slot.kind)
            activation_by_code(slot.activation)
        return cls(*ints[:_HEADER], slots)

    def widths(self) -> dict[str, int]:
        """The sizes of the packed space (plain ints, for fake implementations): rows R,
        columns C, adapters N_ad, experts E, k_width, h_width."""
        return {"rows": self.rows, "columns": self.columns, "adapters": self.adapters,
                "experts": len(self.slots), "k_width": align16(self.columns + self.adapters),
                "h_width": align16(self.columns)}


def layout_code(layout: ExpertLayout) -> tuple[list[int], list[float]]:
    """What the custom ops take for a layout (constants under torch.compile): the
    LayoutCode's ints and the slots' scalings."""
    return LayoutCode.encode(layout).to_ints(), [float(slot.scaling) for slot in layout.slots]


def code_widths(code: list[int]) -> dict[str, int]:
    """LayoutCode.decode(code).widths()."""
    return LayoutCode.decode(code).widths()


def column_rank(code: int) -> int:
    """Where the expert columns of activation `code` go in the packed order (COLUMN_ORDER);
    ValueError for an activation the kernels do not evaluate."""
    activation = activation_by_code(code)
    if activation not in COLUMN_ORDER:
        raise ValueError(f"the triton kernels have no {activation.name!r} activation; they "
                         f"have {', '.join(a.name for a in COLUMN_ORDER)}")
    return COLUMN_ORDER.index(activation)


@dataclass
class KernelLayout:
    """The packed column space of one layout on one device (see the module docstring).

    Ints: columns C, rows R, adapters N_ad, k_width, h_width, act_starts (first K column
    of silu, gelu, relu; each class runs to the next start, relu to C), num_experts,
    experts_pad (a power of two >= 16: the gate-gradient tile), identity_order (K columns
    [0, C) are expand_weight's own order) and identity_rows (h columns [0, C) are the
    shrink rows in order).
    Device tables: column_expert [k_width] int32 (the gate of each K column; 0 on padding),
    column_scale [k_width] fp32 (alpha / r; 1 on bias columns; 0 on padding),
    expand_source [C] int64 (expand_weight column of K column c), expand_inverse [C] int64
    (K column of expand_weight column j), shrink_source [C] int64 (shrink row of h column
    c), shrink_first [R] int64 (the first h column that reads shrink row r).
    hydra_blocks: per hydra group (first shrink row, rank, first h column, heads).
    """

    columns: int
    rows: int
    adapters: int
    k_width: int
    h_width: int
    act_starts: tuple[int, int, int]
    num_experts: int
    experts_pad: int
    identity_order: bool
    identity_rows: bool
    column_expert: torch.Tensor
    column_scale: torch.Tensor
    expand_source: torch.Tensor
    expand_inverse: torch.Tensor
    shrink_source: torch.Tensor
    shrink_first: torch.Tensor
    hydra_blocks: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def of(cls, code: list[int], scales: list[float], device: torch.device) -> KernelLayout:
        """The packed space of `layout_code`'s output on `device` (cached; called inside
        the custom ops, with real tensors)."""
        return cached_layout(_LAYOUTS, cls._build, code, scales, device)

    @classmethod
    def _build(cls, code: list[int], scales: list[float], device: torch.device) -> KernelLayout:
        layout = LayoutCode.decode(code)
        rows, columns, adapters, slots = layout.rows, layout.columns, layout.adapters, \
            layout.slots
        ranks = [column_rank(slot.activation) for slot in slots]
        owner = [0] * columns
        for e, slot in enumerate(slots):
            for c in range(slot.expand_start, slot.expand_stop):
                owner[c] = e
        order = sorted(range(columns), key=lambda c: ranks[owner[c]])
        starts = tuple(next((k for k, c in enumerate(order) if ranks[owner[c]] >= rank),
                            columns) for rank in range(1, len(COLUMN_ORDER)))
        k_width = align16(columns + adapters)
        expert, scale = [0] * k_width, [0.0] * k_width
        source_row = [0] * columns
        for k, c in enumerate(order):
            e = owner[c]
            expert[k], scale[k] = e, scales[e]
            source_row[k] = slots[e].shrink_start + c - slots[e].expand_start
        for e, slot in enumerate(slots):
            if slot.has_bias:
                expert[columns + slot.adapter], scale[columns + slot.adapter] = e, 1.0
        inverse = [0] * columns
        for k, c in enumerate(order):
            inverse[c] = k
        first = [0] * rows
        for k in reversed(range(columns)):
            first[source_row[k]] = k
        hydra, seen = [], set()
        for slot in slots:
            shared = (slot.shrink_start, slot.shrink_stop)
            if slot.kind == EXPERT_KINDS["hydra"] and shared not in seen:
                seen.add(shared)
                heads = sum((s.shrink_start, s.shrink_stop) == shared for s in slots)
                hydra.append((slot.shrink_start, slot.shrink_stop - slot.shrink_start,
                              first[slot.shrink_start], heads))

        def table(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(columns, rows, adapters, k_width, align16(columns), starts, len(slots),
                   max(16, 1 << (len(slots) - 1).bit_length()), order == list(range(columns)),
                   source_row == list(range(rows)), table(expert, torch.int32),
                   table(scale, torch.float32), table(order, torch.int64),
                   table(inverse, torch.int64), table(source_row, torch.int64),
                   table(first, torch.int64), tuple(hydra))


_LAYOUTS: dict[tuple, KernelLayout] = {}


def cached_layout(cache: dict, build: Callable, code: list[int], scales: list[float],
                  device: torch.device):
    """build(code, scales, device), once per distinct (code, scales, device) in `cache`."""
    key = (tuple(code), tuple(scales), torch.device(device))
    meta = cache.get(key)
    if meta is None:
        meta = cache[key] = build(code, scales, torch.device(device))
    return meta


# ---------------------------------------------------------------------------------------
# packed weights, cached per parameter version
# ---------------------------------------------------------------------------------------

@dataclass
class _Entry:
    refs: list
    stamp: tuple
    value: object


_PACKED: dict[tuple, _Entry] = {}
# MOA_TRITON_PACK_CACHE=0 packs on every call (a debugging switch: see `packed`)
_CACHE_ON = os.environ.get("MOA_TRITON_PACK_CACHE", "1") != "0"


def clear_packed() -> None:
    """Forget every cached packed weight (after changing weights through `.data`, which
    bypasses the version counter; see `packed`)."""
    _PACKED.clear()


def _stamp(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device,
            tuple(tensor.shape), tuple(tensor.stride()))


def packed(kind: str, sources: tuple[torch.Tensor, ...], extra: tuple,
           build: Callable[[], object]) -> object:
    """build() for these source tensors, cached until one of them changes (in place: its
    version; or its storage) or dies. `extra` completes the key (dtype, layout tables).
    Inference tensors (made under torch.inference_mode) have no version counter: built
    afresh, not cached. A change made through `tensor.data` (e.g. `p.data.copy_(...)`)
    bypasses the version counter, as it does autograd's checks: call `clear_packed()`
    after one (torch.optim, load_state_dict and in-place updates under no_grad all bump
    the version)."""
    if not _CACHE_ON or any(s.is_inference() for s in sources):
        return build()
    key = (kind, extra, *(id(s) for s in sources))
    stamp = tuple(_stamp(s) for s in sources)
    entry = _PACKED.get(key)
    if entry is not None and entry.stamp == stamp and \
            all(ref() is s for ref, s in zip(entry.refs, sources)):
        return entry.value
    value = build()

    def forget(_, key=key):
        _PACKED.pop(key, None)

    _PACKED[key] = _Entry([weakref.ref(s, forget) for s in sources], stamp, value)
    return value


def pack_expand(meta: KernelLayout, expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """B packed [out, k_width] in `dtype`: expand_weight's columns in K order, the adapters'
    up-biases as columns, zero padding (cached per version of the two tensors)."""
    def build():
        out = expand_weight.shape[0]
        result = torch.zeros(out, meta.k_width, device=expand_weight.device, dtype=dtype)
        weight = expand_weight if meta.identity_order else \
            expand_weight.index_select(1, meta.expand_source)
        result[:, :meta.columns] = weight
        if meta.adapters:
            result[:, meta.columns:meta.columns + meta.adapters] = expand_bias.t()
        return result

    sources = (expand_weight, expand_bias) if meta.adapters else (expand_weight,)
    return packed("expand", sources, (dtype, id(meta)), build)


def pack_shrink(meta: KernelLayout, shrink_weight: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """A packed [h_width, in] in `dtype`: shrink row shrink_source[c] as row c (hydra rows
    repeated per head), zero padding (cached per version of shrink_weight)."""
    def build():
        result = torch.zeros(meta.h_width, shrink_weight.shape[1],
                             device=shrink_weight.device, dtype=dtype)
        rows = shrink_weight if meta.identity_rows else \
            shrink_weight.index_select(0, meta.shrink_source)
        result[:meta.columns] = rows
        return result

    return packed("shrink", (shrink_weight,), (dtype, id(meta)), build)


def pack_shrink_bias(meta: KernelLayout, full_bias: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """The packed shrink bias [h_width] (small: packed per call)."""
    result = full_bias.new_zeros(meta.h_width, dtype=dtype)
    result[:meta.columns] = full_bias if meta.identity_rows else \
        full_bias.index_select(0, meta.shrink_source)
    return result


def unpack_shrink_rows(meta: KernelLayout, packed_rows: torch.Tensor) -> torch.Tensor:
    """The gradient of the shrink rows [R, ...] from the gradient of the packed rows
    [h_width, ...]: each row takes its first h column, hydra rows add their other heads
    (a fixed-order sum: deterministic)."""
    if meta.identity_rows:
        return packed_rows[:meta.rows]
    result = packed_rows.index_select(0, meta.shrink_first)
    for row, rank, column, heads in meta.hydra_blocks:
        blocks = packed_rows[column:column + heads * rank]
        result[row:row + rank] = blocks.reshape(heads, rank, *blocks.shape[1:]).sum(0)
    return result


def unpack_expand(meta: KernelLayout, packed_grad: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d expand_weight [out, C], d expand_bias [N_ad, out]) from d B packed
    [out, k_width], as new tensors (a custom op's outputs may not alias each other)."""
    columns = packed_grad[:, :meta.columns]
    weight = columns.clone(memory_format=torch.contiguous_format) if meta.identity_order \
        else columns.index_select(1, meta.expand_inverse)
    if not meta.adapters:
        return weight, packed_grad.new_empty(0, packed_grad.shape[0])
    bias = packed_grad[:, meta.columns:meta.columns + meta.adapters].t().clone(
        memory_format=torch.contiguous_format)
    return weight, bias
