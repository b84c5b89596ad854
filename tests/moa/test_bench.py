"""The benchmark harness on tiny shapes: it runs, and its ratios are what they claim."""

import math

import pytest
import torch

from moa import bench


def test_median_ratio_pairs_samples_within_rounds():
    samples = {"base": [1.0, 2.0, 4.0], "case": [1.5, 3.0, 6.0]}
    assert bench.median_ratio(samples, "case", "base") == pytest.approx(1.5)
    assert math.isnan(bench.median_ratio(samples, "case", "absent"))


def test_layer_benchmark_on_a_small_shape():
    rows = bench.layer_benchmark(["torch", "reference"], tokens=16, features=32, rounds=2)
    cases = {(r.case, r.backend) for r in rows}
    assert ("base", "-") in cases and ("M8 topk2", "torch") in cases
    assert all(r.forward_ms > 0 and r.fwd_bwd_ms > 0 for r in rows)
    ratio = bench.overhead_ratio(rows, "M8 topk2", "M8 soft", "torch", train=True)
    assert math.isfinite(ratio)


def test_model_benchmark_quick_with_memory_of_one_variant():
    rows = bench.model_benchmark(quick=True, rounds=1, memory=False,
                                 variants=("frozen", "peft_lora", "soft_moa/torch"))
    by_name = {r.variant: r for r in rows}
    assert by_name["peft_lora"].ratio_to_peft == pytest.approx(1.0)
    assert by_name["frozen"].trainable == 0 and by_name["soft_moa/torch"].trainable > 0
    peak = bench._memory_in_subprocess("soft_moa/torch", quick=True,
                                       device=torch.device("cpu"))
    assert peak > 0
