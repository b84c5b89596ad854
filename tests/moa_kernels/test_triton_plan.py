"""moa_kernels/triton/plan.py's LayoutCode (the layout as the custom ops' plain ints) and
the Triton plans' use of the activation and expert-kind tables. Plain Python and the
Triton interpreter (conftest): fast, no GPU.
"""

import pytest
import torch
import triton
import triton.language as tl

from moa.config import parse_experts
from moa.modules.linear import expert_signature
from moa_kernels.activations import ACTIVATIONS, RELU
from moa_kernels.layout import EXPERT_KINDS, ExpertLayout
from moa_kernels.triton import grouped_kernels, grouped_layout, plan
from moa_kernels.triton.grouped_layout import GroupedLayout
from moa_kernels.triton.plan import KernelLayout, LayoutCode, SlotCode, layout_code

MIXED = ["adapter:4:gelu", "lora:3", "hydra:2:2", "lora:5:10", "adapter:6:relu",
         "adapter:2:identity", "adapter:3:silu"]


def layout_of(experts):
    return ExpertLayout.from_specs(parse_experts(experts), 11, 13)


def test_the_layout_code_round_trips_with_named_fields():
    layout = layout_of(MIXED)
    code = LayoutCode.encode(layout)
    assert LayoutCode.decode(code.to_ints()) == code
    assert (code.rows, code.columns, code.adapters) == (layout.shrink_rows,
                                                        layout.expand_columns, 4)
    for slot, coded in zip(layout.slots, code.slots, strict=True):
        assert (coded.shrink_start, coded.shrink_stop) == slot.shrink
        assert (coded.expand_start, coded.expand_stop) == slot.expand
        assert coded.adapter == (-1 if slot.adapter_index is None else slot.adapter_index)
        assert coded.rank == slot.expand[1] - slot.expand[0]


def test_the_plans_kind_and_activation_codes_are_the_tables_and_the_saved_signatures():
    # one set of codes: the layout code, the tables and the expert_signature saved in
    # adapter files (lora was 0 in the Triton plan before the tables)
    specs = parse_experts(MIXED)
    layout = ExpertLayout.from_specs(specs, 11, 13)
    code = LayoutCode.encode(layout)
    activation_codes = {a.name: a.code for a in ACTIVATIONS}
    assert [s.kind for s in code.slots] == [EXPERT_KINDS[s.kind] for s in layout.slots]
    assert [s.activation for s in code.slots] == [activation_codes[s.activation]
                                                  for s in layout.slots]
    signature = expert_signature(specs, torch.device("cpu"))
    per_slot = [row for spec, row in zip(specs, signature.tolist())
                for _ in range(spec.num_experts)]
    assert [s.kind for s in code.slots] == [row[0] for row in per_slot]
    assert [s.activation for s in code.slots] == [row[3] for row in per_slot]


def _with_slot_field(ints: list[int], field: str, value: int) -> list[int]:
    slot = list(SlotCode.__dataclass_fields__).index(field)
    ints = list(ints)
    ints[3 + slot] = value  # the first slot's field
    return ints


@pytest.mark.parametrize("change, message", [
    (lambda ints: ints[:-1], "a layout code has 3 \\+ 7 x experts ints, got"),  # truncated
    (lambda ints: ints[:2], "got 2"),  # shorter than its header
    (lambda ints: _with_slot_field(ints, "kind", 0), "unknown expert kind code 0"),  # old lora
    (lambda ints: _with_slot_field(ints, "kind", 4), "unknown expert kind code 4"),
    (lambda ints: _with_slot_field(ints, "activation", 4), "unknown activation code 4"),
    (lambda ints: _with_slot_field(ints, "activation", -1), "unknown activation code -1"),
])
def test_decode_refuses_a_code_the_tables_do_not_know(change, message):
    ints, scales = layout_code(layout_of(MIXED))
    bad = change(ints)
    with pytest.raises(ValueError, match=message):
        LayoutCode.decode(bad)
    # and so do both plans, before any kernel runs
    with pytest.raises(ValueError, match=message):
        KernelLayout.of(bad, scales, "cpu")
    with pytest.raises(ValueError, match=message):
        GroupedLayout.of(bad, scales, "cpu")


def test_the_plans_refuse_an_activation_their_kernels_do_not_evaluate(monkeypatch):
    # a table entry without a kernel (here relu, taken out of both kernels' lists) is
    # refused at plan time, never run as the identity
    ints, scales = layout_code(layout_of(["lora:2", "adapter:3:relu"]))
    monkeypatch.setattr(plan, "COLUMN_ORDER", tuple(a for a in plan.COLUMN_ORDER
                                                    if a is not RELU))
    with pytest.raises(ValueError, match="the triton kernels have no 'relu' activation"):
        KernelLayout.of(ints, scales, "cpu")
    monkeypatch.setattr(grouped_layout, "GROUPED_ACTIVATIONS", tuple(
        a for a in grouped_kernels.GROUPED_ACTIVATIONS if a is not RELU))
    with pytest.raises(ValueError, match="the grouped kernels have no 'relu' activation"):
        GroupedLayout.of(ints, scales, "cpu")


@triton.jit
def _activation_probe(h_ptr, out_ptr, code, N: tl.constexpr):
    columns = tl.arange(0, N)
    h = tl.load(h_ptr + columns)
    tl.store(out_ptr + columns, grouped_kernels._activation(h, code, True))
    tl.store(out_ptr + N + columns, grouped_kernels._activation_grad(h, code, True))


@pytest.mark.parametrize("code", [
    *[a.code for a in ACTIVATIONS],  # every code of the table
    4,  # unknown: one past the largest
    -1,  # unknown: negative
])
def test_the_grouped_jit_helpers_follow_the_table_and_never_run_identity_for_an_unknown_code(
        code):
    hidden = torch.randn(16, generator=torch.Generator().manual_seed(3))
    out = torch.empty(32)
    _activation_probe[(1,)](hidden, out, code, N=16)
    known = {a.code: a for a in ACTIVATIONS}
    if code not in known:
        assert torch.isnan(out).all()
        return
    leaf = hidden.double().requires_grad_(True)
    (derivative,) = torch.autograd.grad(known[code].function(leaf).sum(), leaf)
    torch.testing.assert_close(out[:16], known[code].function(hidden), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[16:], derivative.float(), rtol=1e-5, atol=1e-6)
