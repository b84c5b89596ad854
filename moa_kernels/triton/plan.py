"""Kernel metadata: the layout as small int32 tables, and a routing plan built without a
host synchronisation.

`KernelLayout` (one per ExpertLayout and device, cached in the layout) gives every kernel
the ragged segments as device tables, one row of 8 int32 per expert or shrink group:

    expert_meta [E, 8]:  col_start, col_stop, row_start, activation, adapter (-1: none),
                         group, 0, 0        (columns of expand_weight, rows of h)
    group_meta  [G, 8]:  row_start, row_stop, row_start, 0, -1, expert_start, expert_stop,
                         activation         (a shrink group: rows shared by its experts,
                                             one expert each except hydra heads)

The first five columns of both tables have the same meaning ("segment": right-operand
range, left-operand start, activation, adapter), so the segmented GEMM reads either.

`TritonPlan.build(active)` lists the active (token, expert) pairs sorted by expert then
token with a cumsum and a scatter: fixed-size tensors, no nonzero(), no .tolist(), no
host sync. Pairs past an expert's count are never read (kernels early-exit on counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moa_kernels.layout import ExpertLayout
from moa_kernels.triton.kernel_utils import ACTIVATION_CODES


@dataclass
class KernelLayout:
    expert_meta: torch.Tensor  # [E, 8] int32
    expert_scale: torch.Tensor  # [E] fp32
    group_meta: torch.Tensor  # [G, 8] int32
    expert_group: torch.Tensor  # [E] int64
    num_experts: int
    num_groups: int
    max_rank: int
    shared_shrink: bool

    @classmethod
    def of(cls, layout: ExpertLayout, device: torch.device) -> KernelLayout:
        """The (cached) tables of `layout` on `device`."""
        device = torch.device(device)
        key = ("moa_kernels.triton", device)
        if key not in layout._cache:
            layout._cache[key] = cls._build(layout, device)
        return layout._cache[key]

    @classmethod
    def _build(cls, layout: ExpertLayout, device: torch.device) -> KernelLayout:
        groups: list[list[int]] = []
        for e, slot in enumerate(layout.slots):
            if groups and layout.slots[groups[-1][0]].shrink == slot.shrink:
                groups[-1].append(e)
            else:
                groups.append([e])
        expert_rows, expert_group = [], []
        for g, members in enumerate(groups):
            for e in members:
                slot = layout.slots[e]
                adapter = -1 if slot.adapter_index is None else slot.adapter_index
                expert_rows.append([slot.expand[0], slot.expand[1], slot.shrink[0],
                                    ACTIVATION_CODES[slot.activation], adapter, g, 0, 0])
                expert_group.append(g)
        group_rows = []
        for members in groups:
            slot = layout.slots[members[0]]
            group_rows.append([slot.shrink[0], slot.shrink[1], slot.shrink[0], 0, -1,
                               members[0], members[-1] + 1, ACTIVATION_CODES[slot.activation]])
        return cls(
            torch.tensor(expert_rows, dtype=torch.int32, device=device),
            torch.tensor([s.scaling for s in layout.slots], dtype=torch.float32, device=device),
            torch.tensor(group_rows, dtype=torch.int32, device=device),
            torch.tensor(expert_group, dtype=torch.int64, device=device),
            len(layout.slots), len(groups), max(s.rank for s in layout.slots),
            len(groups) != len(layout.slots))


@dataclass
class PairList:
    """Active pairs of one [T, S] mask (S experts or groups), sorted by column then token.

    token_index [T * S + 1] int32 (entries past offsets[S] are unused), offsets [S + 1]
    int64, active [T, S] int8.
    """

    token_index: torch.Tensor
    offsets: torch.Tensor
    active: torch.Tensor

    @classmethod
    def build(cls, active: torch.Tensor) -> PairList:
        tokens, columns = active.shape
        by_column = active.t()
        counts = by_column.sum(dim=1)
        offsets = torch.zeros(columns + 1, dtype=torch.int64, device=active.device)
        torch.cumsum(counts, dim=0, out=offsets[1:])
        rank_in_column = torch.cumsum(by_column.to(torch.int64), dim=1) - 1
        dump = tokens * columns  # inactive pairs all land in this one spare slot
        destination = torch.where(by_column, offsets[:-1, None] + rank_in_column, dump)
        token_ids = torch.arange(tokens, dtype=torch.int32, device=active.device)
        token_index = torch.zeros(dump + 1, dtype=torch.int32, device=active.device)
        token_index.scatter_(0, destination.reshape(-1), token_ids.expand(columns, tokens)
                             .reshape(-1))
        return cls(token_index, offsets, active.to(torch.int8).contiguous())


@dataclass
class TritonPlan:
    """The routing plan of one router call: pairs by expert, and by shrink group (the same
    object when no expert shares its shrink rows)."""

    experts: PairList
    groups: PairList

    @classmethod
    def build(cls, active: torch.Tensor, meta: KernelLayout) -> TritonPlan:
        """From active [T, E] bool."""
        experts = PairList.build(active)
        if not meta.shared_shrink:
            return cls(experts, experts)
        group_hits = active.new_zeros(active.shape[0], meta.num_groups, dtype=torch.float32)
        group_hits.index_add_(1, meta.expert_group, active.to(torch.float32))
        return cls(experts, PairList.build(group_hits > 0))
