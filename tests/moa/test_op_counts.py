"""The aten ops a decoder layer runs in a training step stay pinned (on a GPU each is a
kernel launch): measured as benchmarks/op_counts.py measures them (forward and backward
of the tiny Llama, views excluded, the 2-layer model's ops minus the 1-layer model's,
after an optimizer step), against PEFT LoRA r=16 on the same modules where peft is
installed, else against the counts pinned here. A change that adds ops per layer fails
here; one that removes some lowers the pins (benchmarks/RESULTS.md has the history)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[2]

# Ops per decoder layer in a training step, as pinned on 2026-12-06 (PEFT LoRA r16: 144,
# the frozen model: 94): each MoA preset's count, and its excess over PEFT's.
PINNED = {"soft_moa": 199, "sparse_moa": 207}
PEFT_OPS = 144


def _op_counts():
    return benchmark_script("op_counts")


@pytest.fixture(scope="module")
def op_counts():
    return _op_counts()


@pytest.fixture(scope="module")
def peft_ops(op_counts):
    """PEFT LoRA r16's ops per layer, measured here, or the pinned count without peft."""
    if importlib.util.find_spec("peft") is None:
        return PEFT_OPS
    return sum(op_counts.per_layer(op_counts.training_step_ops, "peft_lora").values())


@pytest.mark.parametrize("preset", sorted(PINNED))  # the paper's two presets
def test_ops_per_decoder_layer_in_a_training_step_stay_pinned(preset, op_counts, peft_ops):
    ops = sum(op_counts.per_layer(op_counts.training_step_ops, preset).values())
    assert ops - peft_ops <= PINNED[preset] - PEFT_OPS, \
        f"{preset}: {ops} aten ops per decoder layer, PEFT LoRA r16 {peft_ops}"


def test_the_count_sees_a_layers_ops(op_counts, monkeypatch):
    # the measurement must move when a layer does more: one more op in every MoALinear
    # call (an extra copy of its output) shows as five per soft_moa decoder layer
    from moa.modules.linear import MoALinear

    before = sum(op_counts.per_layer(op_counts.training_step_ops, "soft_moa").values())
    forward = MoALinear.forward
    monkeypatch.setattr(MoALinear, "forward", lambda self, *args, **kwargs:
                        forward(self, *args, **kwargs).clone())
    after = sum(op_counts.per_layer(op_counts.training_step_ops, "soft_moa").values())
    assert after == before + 5


def test_origins_split_the_same_count_by_where_each_op_comes_from(op_counts):
    # --origins: the same ops per layer as the plain count, each keyed by its origin (the
    # autograd node and the forward's source line, or the forward's own line)
    plain = op_counts.per_layer(op_counts.training_step_ops, "lora")
    origins = op_counts.per_layer(
        lambda name, layers: op_counts.training_step_ops(name, layers, origins=True), "lora")
    assert sum(origins.values()) == sum(plain.values()) > 0
    by_op = {}
    for key, count in origins.items():
        op, origin = key.split("  <- ")
        by_op[op] = by_op.get(op, 0) + count
        assert origin.startswith(("forward ", "backward ")) and "?" not in origin, key
    assert by_op == dict(plain)
    assert any("GatedExpandBackward of moa_kernels/torch_ops.py" in key for key in origins)
