"""Static description of one layer's experts, stacked raggedly.

All experts of a layer share two stacked weights, with no padding to the largest rank:

    shrink_weight  [R, in]   rows: every lora/hydra A, then every adapter W_down
    shrink_bias    [R_ad]    the adapters' down biases (the last R_ad shrink rows)
    expand_weight  [out, C]  columns: every expert's B (hydra: one block per head), W_up
    expand_bias    [N_ad, out] the adapters' up biases, one row per adapter

Expert e (0..E-1, in the user's order; a hydra spec gives `heads` consecutive experts)
owns shrink rows `shrink[e]` and expand columns `expand[e]`. Expand column c reads
shrink row `column_source[c]`, is scaled by `column_scale[c]` and gated by expert
`column_expert[c]`. Without hydra experts column_source is the identity.
The layout is plain Python, O(E) of it (ranges per expert, never per row or column);
`index_tensors(device)` gives (and caches) its index tensors, each linear in the rank;
`cached(key, build)` keeps anything else an op derives from the layout (e.g. the Triton
layout code), once per layout.
Everything derived from the slots is computed once, at construction, into plain attributes:
torch.compile reads them as constants (functools.cached_property takes a lock, which
breaks a graph).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

import torch

# The expert kinds and their codes: the code is what moa's expert_signature saves in every
# adapter file and what the Triton layout code carries, so a code never changes (saved
# adapters must load). Listed in the order users see them.
EXPERT_KINDS: Mapping[str, int] = MappingProxyType({"lora": 1, "adapter": 2, "hydra": 3})
_KIND_OF_CODE = {code: kind for kind, code in EXPERT_KINDS.items()}
_Built = TypeVar("_Built")


def kind_code(kind: str) -> int:
    """The code of expert kind `kind`; ValueError naming the allowed kinds otherwise."""
    if not isinstance(kind, str) or kind not in EXPERT_KINDS:
        raise ValueError(f"unknown expert kind {kind!r}; allowed: {', '.join(EXPERT_KINDS)}")
    return EXPERT_KINDS[kind]


def kind_of_code(code: int) -> str:
    """The expert kind whose code is `code`; ValueError naming the allowed codes otherwise."""
    kind = _KIND_OF_CODE.get(code) if isinstance(code, int) and not isinstance(code, bool) \
        else None
    if kind is None:
        allowed = ", ".join(f"{c} ({k})" for k, c in EXPERT_KINDS.items())
        raise ValueError(f"unknown expert kind code {code!r}; allowed: {allowed}")
    return kind


@dataclass(frozen=True)
class ExpertSlot:
    """Where one gated expert lives in the stacked weights."""

    kind: str  # "lora" | "adapter" | "hydra"
    shrink: tuple[int, int]  # rows of shrink_weight
    expand: tuple[int, int]  # columns of expand_weight
    scaling: float
    activation: str  # "identity" for lora/hydra
    adapter_index: int | None  # row of expand_bias (adapters only)

    @property
    def rank(self) -> int:
        return self.shrink[1] - self.shrink[0]


@dataclass(frozen=True)
class ActivationSegment:
    """A run of shrink rows sharing one non-identity activation (adapter bottlenecks)."""

    start: int
    stop: int
    activation: str


@dataclass
class ExpertLayout:
    """The static layout of one layer's experts, stacked raggedly: lora and hydra A rows
    first, then the adapters' down rows, in the shrink weight [R, in]; their B columns in
    the expand weight [out, C]; one slot per gated expert (a hydra spec gives one per head;
    `from_specs`)."""

    in_features: int
    out_features: int
    slots: list[ExpertSlot]
    shrink_rows: int  # R
    expand_columns: int  # C
    bias_start: int  # first shrink row with a bias (= rows of lora and hydra A's)
    activation_segments: list[ActivationSegment]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Derived once (the slots never change): plain attributes, constant under compile.
        self.num_experts = len(self.slots)
        self.num_adapters = sum(slot.adapter_index is not None for slot in self.slots)
        # True when every expert's scaling is 1 (alpha = r), so gates need no rescaling.
        self.unit_scaling = all(slot.scaling == 1.0 for slot in self.slots)
        # True when some shrink rows feed several experts (hydra heads).
        self.has_shared_shrink = any(slot.kind == "hydra" for slot in self.slots)
        # (shrink row start, stop, heads) per run of expand columns, in column order: the
        # columns read rows start..stop-1, `heads` times over (hydra heads share rows).
        self.column_blocks = self._column_blocks()
        # Built now, on the CPU: torch.compile then reads them as tensors (a guard on each
        # of a few tensors, not one per element of Python lists).
        cpu = torch.device("cpu")
        self._cache[cpu] = self._make_index_tensors(cpu)

    @classmethod
    def from_specs(cls, specs, in_features: int, out_features: int) -> ExpertLayout:
        """Build from expert specs (objects with kind, size, scaling, activation, heads)."""
        order = sorted(range(len(specs)), key=lambda i: specs[i].kind == "adapter")
        shrink_of_spec, row = {}, 0
        for i in order:
            shrink_of_spec[i] = (row, row + specs[i].size)
            row += specs[i].size
        bias_start = sum(s.size for s in specs if s.kind != "adapter")
        slots, column, adapters = [], 0, 0
        column_of_spec = {}
        for i in order:
            heads = specs[i].heads if specs[i].kind == "hydra" else 1
            column_of_spec[i] = [(column + h * specs[i].size, column + (h + 1) * specs[i].size)
                                 for h in range(heads)]
            column += heads * specs[i].size
        for i, spec in enumerate(specs):
            is_adapter = spec.kind == "adapter"
            for expand in column_of_spec[i]:
                slots.append(ExpertSlot(spec.kind, shrink_of_spec[i], expand, spec.scaling,
                                        spec.activation, adapters if is_adapter else None))
            adapters += is_adapter
        segments = []
        for i in order:
            if specs[i].kind == "adapter" and specs[i].activation != "identity":
                start, stop = shrink_of_spec[i]
                if segments and segments[-1].stop == start and \
                        segments[-1].activation == specs[i].activation:
                    start = segments.pop().start
                segments.append(ActivationSegment(start, stop, specs[i].activation))
        return cls(in_features, out_features, slots, row, column, bias_start, segments)

    def full_shrink_bias(self, shrink_bias: torch.Tensor) -> torch.Tensor:
        """The bias of every shrink row [R]: zeros for the lora/hydra rows, then the adapters'
        down biases shrink_bias [R - bias_start]."""
        return torch.cat([shrink_bias.new_zeros(self.bias_start), shrink_bias])

    def expert_tensors(self, shrink_weight: torch.Tensor, shrink_bias: torch.Tensor,
                       expand_weight: torch.Tensor, expand_bias: torch.Tensor
                       ) -> list[dict[str, torch.Tensor]]:
        """Per expert, views of its tensors in the stacked ones: lora/hydra
        {"lora_A" [r, in], "lora_B" [out, r]} (hydra heads share lora_A); adapter
        {"down_weight" [size, in], "down_bias" [size], "up_weight" [out, size],
        "up_bias" [out]}."""
        result = []
        for slot in self.slots:
            rows, columns = slice(*slot.shrink), slice(*slot.expand)
            if slot.kind == "adapter":
                bias_rows = slice(slot.shrink[0] - self.bias_start,
                                  slot.shrink[1] - self.bias_start)
                result.append({"down_weight": shrink_weight[rows],
                               "down_bias": shrink_bias[bias_rows],
                               "up_weight": expand_weight[:, columns],
                               "up_bias": expand_bias[slot.adapter_index]})
            else:
                result.append({"lora_A": shrink_weight[rows],
                               "lora_B": expand_weight[:, columns]})
        return result

    def _column_blocks(self) -> tuple[tuple[int, int, int], ...]:
        blocks = []  # [row start, row stop, heads, hydra?] in column order
        for slot in sorted(self.slots, key=lambda s: s.expand[0]):
            hydra = slot.kind == "hydra"
            last = blocks[-1] if blocks else None
            if last and hydra and last[3] and (last[0], last[1]) == slot.shrink:
                last[2] += 1  # the next head of the same hydra spec
            elif last and not hydra and not last[3] and last[1] == slot.shrink[0]:
                last[1] = slot.shrink[1]  # a run of unshared experts: one block
            else:
                blocks.append([*slot.shrink, 1, hydra])
        return tuple((start, stop, heads) for start, stop, heads, _ in blocks)

    def _make_index_tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        # Built with tensor ops from the slots' ranges: O(E) Python steps, and every tensor
        # holds O(R + C) numbers (the two maps O(E (R + C))), whatever the ranks.
        experts, rows, columns = self.num_experts, self.shrink_rows, self.expand_columns
        int64 = {"dtype": torch.int64, "device": device}
        float32 = {"dtype": torch.float32, "device": device}
        by_column = sorted(range(experts), key=lambda e: self.slots[e].expand[0])
        column_source = torch.cat([torch.arange(*self.slots[e].shrink, **int64)
                                   for e in by_column])
        widths = torch.tensor([self.slots[e].rank for e in by_column], **int64)
        column_expert = torch.tensor(by_column, **int64).repeat_interleave(widths)
        scales = torch.tensor([slot.scaling for slot in self.slots], **float32)
        column_scale = scales[column_expert]
        adapter_experts = torch.tensor(
            [e for e, slot in enumerate(self.slots) if slot.adapter_index is not None], **int64)
        # gate_map [C + N_ad, E]: column c's scaling in the column of its expert, then a 1
        # per adapter (its gated up-bias); d gates = [d u_columns * act, d u_bias] @ gate_map.
        gate_map = torch.zeros(columns + self.num_adapters, experts, **float32)
        gate_map[torch.arange(columns, **int64), column_expert] = column_scale
        gate_map[columns + torch.arange(self.num_adapters, **int64), adapter_experts] = 1.0
        row_owner = torch.zeros(experts, rows, **float32)
        for e, slot in enumerate(self.slots):
            row_owner[e, slot.shrink[0]:slot.shrink[1]] = 1.0
        return {"column_source": column_source, "column_expert": column_expert,
                "column_scale": column_scale, "adapter_experts": adapter_experts,
                "row_owner": row_owner, "gate_map": gate_map}

    def cached(self, key: str, build: Callable[[], _Built]) -> _Built:
        """build(), once per layout and key in eager mode (an op's own derived data, e.g.
        the Triton layout code; `key` names the op, e.g. "moa_kernels.triton.code").
        Under torch.compile build() runs at every trace and nothing is cached: plain
        Python, a constant of the graph, and no cache written while tracing."""
        if torch.compiler.is_compiling():
            return build()
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def index_tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Index tensors on `device` (built on the CPU with the layout, cached per device
        at the first eager call; under torch.compile read from the cache, or copied from the
        CPU ones inside the graph, so no cache is written while tracing):
        column_source [C] int64, column_expert [C] int64, column_scale [C] float32,
        adapter_experts [N_ad] int64 (expert index of each expand_bias row), row_owner
        [E, R] float32 (1 where expert e reads shrink row r), gate_map [C + N_ad, E] float32
        (column c's scaling at its expert, then 1 at each adapter's expert). The maps turn
        the per-expert sums into small GEMMs (deterministic; no scatter for the compiler).
        Every tensor is linear in the rank: O(R + C) numbers, the maps O(E (R + C)); no
        [C, R] map (hydra heads' shared rows are gathered and summed by `column_blocks`).
        """
        device = torch.device(device)
        if device not in self._cache and torch.compiler.is_compiling():
            return {name: tensor.to(device)
                    for name, tensor in self._cache[torch.device("cpu")].items()}
        if device not in self._cache:
            self._cache[device] = self._make_index_tensors(device)
        return self._cache[device]
