"""moa_kernels/layout.py: where each expert lives in the ragged stacked weights.

The reference and fused backends share the layout, so a layout bug would be invisible to
the backend-vs-reference tests; these tests pin it down against hand-written offsets.
"""

import time
import tracemalloc

import pytest
import torch

from moa.config import EXPERT_KINDS as EXPERT_KIND_NAMES
from moa.config import ExpertSpec, parse_experts
from moa_kernels.layout import (
    EXPERT_KINDS,
    ActivationSegment,
    ExpertLayout,
    kind_code,
    kind_of_code,
)


def layout_of(experts, in_features=11, out_features=13):
    return ExpertLayout.from_specs(parse_experts(experts), in_features, out_features)


def test_mixed_layout_offsets_written_out():
    # User order: adapter, lora, hydra (2 heads), lora with alpha, adapter.
    # Shrink rows: every lora/hydra A first (user order), then the adapters' W_down.
    # Expand columns follow the same order; a hydra spec owns one column block per head.
    layout = layout_of(["adapter:4:gelu", "lora:3", "hydra:2:2", "lora:5:10",
                        "adapter:6:relu"])
    assert layout.num_experts == 6  # hydra counts as its 2 heads
    assert layout.num_adapters == 2
    assert layout.has_shared_shrink
    assert layout.shrink_rows == 3 + 2 + 5 + 4 + 6  # no padding to the largest rank
    assert layout.expand_columns == 3 + 2 * 2 + 5 + 4 + 6
    assert layout.bias_start == 3 + 2 + 5
    got = [(s.kind, s.shrink, s.expand, s.scaling, s.activation, s.adapter_index)
           for s in layout.slots]
    assert got == [
        ("adapter", (10, 14), (12, 16), 1.0, "gelu", 0),
        ("lora", (0, 3), (0, 3), 1.0, "identity", None),
        ("hydra", (3, 5), (3, 5), 1.0, "identity", None),
        ("hydra", (3, 5), (5, 7), 1.0, "identity", None),  # shares the A rows of head 0
        ("lora", (5, 10), (7, 12), 2.0, "identity", None),  # alpha / r = 10 / 5
        ("adapter", (14, 20), (16, 22), 1.0, "relu", 1),
    ]
    assert [s.rank for s in layout.slots] == [4, 3, 2, 2, 5, 6]
    assert layout.activation_segments == [ActivationSegment(10, 14, "gelu"),
                                          ActivationSegment(14, 20, "relu")]


def test_index_tensors_written_out_and_cached():
    layout = layout_of(["hydra:2:2", "adapter:1:silu", "lora:1:3"])
    index = layout.index_tensors(torch.device("cpu"))
    # Experts: hydra heads 0 and 1, adapter 2, lora 3. Columns: hydra head 0 [0, 2),
    # head 1 [2, 4) (both read rows 0, 1), lora [4, 5) reads row 2, adapter [5, 6) row 3.
    assert index["column_source"].tolist() == [0, 1, 0, 1, 2, 3]
    assert index["column_expert"].tolist() == [0, 0, 1, 1, 3, 2]
    assert index["column_scale"].tolist() == [1.0, 1.0, 1.0, 1.0, 3.0, 1.0]
    assert index["adapter_experts"].tolist() == [2]
    assert index["column_source"].dtype == torch.int64
    assert index["column_expert"].dtype == torch.int64
    assert index["column_scale"].dtype == torch.float32
    # gate_map [C + N_ad, E]: each column's scaling at its expert, then 1 at the adapter's
    assert index["gate_map"].tolist() == [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0],
                                          [0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0],
                                          [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 1.0, 0.0],
                                          [0.0, 0.0, 1.0, 0.0]]
    # row_owner [E, R]: both hydra heads read rows 0, 1; the lora row 2; the adapter row 3
    assert index["row_owner"].tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0],
                                           [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    assert layout.column_blocks == ((0, 2, 2), (2, 4, 1))
    assert layout.index_tensors("cpu") is index  # cached per device


@pytest.mark.parametrize("experts, blocks", [
    # hydra heads read their rows once per head; plain experts after them form one run
    (["adapter:4:gelu", "lora:3", "hydra:2:2", "lora:5:10", "adapter:6:relu"],
     ((0, 3, 1), (3, 5, 2), (5, 20, 1))),
    (["lora:2", "lora:3"], ((0, 5, 1),)),  # no hydra: the identity, one block
    (["hydra:3:4"], ((0, 3, 4),)),  # a lone hydra
    (["hydra:2:2", "hydra:1:3"], ((0, 2, 2), (2, 3, 3))),  # two hydras side by side
    (["hydra:2:1", "lora:1"], ((0, 2, 1), (2, 3, 1))),  # a one-head hydra is its own block
], ids=["mixed", "no-hydra", "hydra-only", "two-hydras", "one-head-hydra"])
def test_column_blocks_written_out(experts, blocks):
    assert layout_of(experts).column_blocks == blocks


def test_layout_memory_and_time_are_linear_in_the_rank():
    """Ranks in the tens of thousands: the layout is ranges per expert and its index tensors
    hold O(E (R + C)) numbers. (Per-column Python lists and a [C, R] source map took 13 s
    and 3 GB at lora:16000 and ran out of memory at lora:100000.)"""

    def build(experts):
        tracemalloc.start()
        start = time.perf_counter()
        try:
            layout = layout_of(experts, 4, 4)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        numbers = sum(t.numel() for t in layout.index_tensors("cpu").values())
        bound = (layout.num_experts + 4) * (layout.shrink_rows + layout.expand_columns +
                                              layout.num_adapters)
        assert numbers <= bound, (experts, numbers, bound)
        return seconds, peak

    # First a size that a quadratic layout survives (its [C, R] lists take ~200 MB), so a
    # regression fails here rather than exhausting the machine's memory below.
    seconds, peak = build(["lora:2000", "hydra:1000:2", "adapter:1000:gelu"])
    assert peak < 2_000_000, f"{peak} bytes of Python objects for R = 4000"
    seconds, peak = build(["lora:100000", "hydra:30000:3", "adapter:20000:gelu"])
    assert peak < 2_000_000, f"{peak} bytes of Python objects for R = 150000"
    assert seconds < 5.0, f"{seconds:.1f} s to lay out R = 150000"


@pytest.mark.parametrize(
    "experts, segments",
    [
        # same activation, adjacent rows (a lora between them in user order): one segment
        (["adapter:4:gelu", "lora:2", "adapter:3:gelu"], [(2, 9, "gelu")]),
        # alternating activations: one segment each, never merged across a change
        (["adapter:4:gelu", "adapter:3:silu", "adapter:2:gelu"],
         [(0, 4, "gelu"), (4, 7, "silu"), (7, 9, "gelu")]),
        # identity adapters need no activation pass and break a run
        (["adapter:2:relu", "adapter:3:identity", "adapter:1:relu"],
         [(0, 2, "relu"), (5, 6, "relu")]),
        # lora and hydra only: no segments at all
        (["lora:8", "hydra:4:2"], []),
    ],
    ids=["merge-same", "alternate", "identity-gap", "no-adapters"],
)
def test_activation_segments(experts, segments):
    layout = layout_of(experts)
    assert [(s.start, s.stop, s.activation) for s in layout.activation_segments] == segments


@pytest.mark.parametrize(
    "experts",
    [
        ["lora:1"],  # E = 1, smallest rank
        ["lora:1", "lora:2", "lora:7", "lora:16", "lora:31", "lora:64"],  # ranks 1..64
        ["adapter:16:silu"],  # adapter only
        ["hydra:8:8"],  # HydraLoRA: one A, 8 heads
        ["adapter:3:gelu", "hydra:5:3", "lora:4:8", "adapter:1:identity", "lora:2"],  # mix
    ],
)
def test_layout_invariants(experts):
    specs = parse_experts(experts)
    layout = ExpertLayout.from_specs(specs, 5, 7)
    assert layout.num_experts == sum(s.num_experts for s in specs)
    assert layout.shrink_rows == sum(s.size for s in specs)
    assert layout.expand_columns == sum(s.size * s.num_experts for s in specs)
    # Expand columns tile [0, C) exactly once, each block as wide as its shrink block.
    covered = sorted(c for slot in layout.slots for c in range(*slot.expand))
    assert covered == list(range(layout.expand_columns))
    for slot in layout.slots:
        assert slot.expand[1] - slot.expand[0] == slot.shrink[1] - slot.shrink[0]
        assert (slot.adapter_index is not None) == (slot.kind == "adapter")
        if slot.kind == "adapter":
            assert slot.shrink[0] >= layout.bias_start
        else:
            assert slot.shrink[1] <= layout.bias_start
    # Shrink rows tile [0, R) (hydra heads share theirs).
    rows = sorted({r for slot in layout.slots for r in range(*slot.shrink)})
    assert rows == list(range(layout.shrink_rows))
    # Slots follow the user's order of experts (gate e is slot e).
    kinds = [s.kind for s in specs for _ in range(s.num_experts)]
    assert [slot.kind for slot in layout.slots] == kinds
    assert [slot.scaling for slot in layout.slots] == \
        [s.scaling for s in specs for _ in range(s.num_experts)]
    assert layout.has_shared_shrink == any(s.kind == "hydra" for s in specs)


def test_layout_from_expert_spec_objects():
    # from_specs takes ExpertSpec objects; hydra alpha gives alpha / r per head.
    layout = ExpertLayout.from_specs([ExpertSpec.hydra(4, 2, alpha=2.0)], 3, 3)
    assert [s.scaling for s in layout.slots] == [0.5, 0.5]
    assert [s.shrink for s in layout.slots] == [(0, 4), (0, 4)]
    assert [s.expand for s in layout.slots] == [(0, 4), (4, 8)]


def test_compiled_index_tensors_guard_on_tensors_not_list_elements():
    """Under torch.compile the index tensors are read from the layout's cache: the graph's
    guards check a few tensors, not every element of the Python lists behind them (tens
    of thousands of guards on a model, evaluated at every compiled call)."""
    layout = ExpertLayout.from_specs(parse_experts("lora:4,hydra:3:2,adapter:5:silu"), 16, 12)

    def gathered(x):
        index = layout.index_tensors(x.device)
        columns = x.index_select(1, index["column_source"]) * index["column_scale"]
        return columns @ index["gate_map"][:layout.expand_columns]

    x = torch.randn(3, layout.shrink_rows)
    explained = torch._dynamo.explain(gathered)(x)
    sources = [str(guard.name) for guard in explained.out_guards]
    assert explained.graph_break_count == 0
    assert not any("_index_lists" in source for source in sources), sources
    torch.testing.assert_close(torch.compile(gathered, backend="eager", fullgraph=True)(x),
                               gathered(x), rtol=0, atol=0)


# --- the table of expert kinds and the per-layout cache ------------------------------------

def test_the_saved_kind_codes_never_change():
    # adapters saved by earlier versions carry these codes in their expert_signature
    assert dict(EXPERT_KINDS) == {"lora": 1, "adapter": 2, "hydra": 3}


@pytest.mark.parametrize("kind", ["lora", "adapter", "hydra"])  # every kind of the table
def test_every_kind_round_trips(kind):
    assert kind_of_code(kind_code(kind)) == kind


@pytest.mark.parametrize("kind", [
    "LoRA",  # a known kind in another case
    "ia3",  # a real adapter kind the table does not have
    None,  # not a string
])
def test_an_unknown_kind_raises_naming_the_allowed_ones(kind):
    with pytest.raises(ValueError, match=r"unknown expert kind .*allowed: lora, adapter, hydra"):
        kind_code(kind)


@pytest.mark.parametrize("code", [
    0,  # triton's old code for lora: no longer a kind
    4,  # one past the largest code
    True,  # a bool, although True == 1
])
def test_an_unknown_kind_code_raises_naming_the_allowed_ones(code):
    with pytest.raises(ValueError, match=r"unknown expert kind code .*allowed: 1 \(lora\), "
                                         r"2 \(adapter\), 3 \(hydra\)"):
        kind_of_code(code)


def test_the_config_lists_the_tables_kinds():
    assert EXPERT_KIND_NAMES == tuple(EXPERT_KINDS) == ("lora", "adapter", "hydra")


def test_cached_builds_once_per_layout_and_key():
    layout, other = layout_of(["lora:2", "adapter:3"]), layout_of(["lora:2", "adapter:3"])
    built = []

    def build():
        built.append(1)
        return object()

    first = layout.cached("test.key", build)
    assert layout.cached("test.key", build) is first and len(built) == 1
    assert layout.cached("test.other", build) is not first and len(built) == 2
    assert other.cached("test.key", build) is not first and len(built) == 3
