"""The benchmark harness on tiny shapes: it runs, and its ratios are what they claim."""

import math

import pytest
import torch

from moa.cli import bench


def test_median_ratio_pairs_samples_within_rounds():
    samples = {"base": [1.0, 2.0, 4.0], "case": [1.5, 3.0, 6.0]}
    assert bench.median_ratio(samples, "case", "base") == pytest.approx(1.5)
    assert math.isnan(bench.median_ratio(samples, "case", "absent"))


def test_interleaved_samples_alternate_the_order_of_each_round():
    """Even rounds run the functions in order, odd rounds in reverse: no function always
    follows the same neighbour."""
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = bench.interleaved_samples(functions, rounds=3, device=torch.device("cpu"),
                                        warmup=1)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert all(len(samples[name]) == 3 and all(t >= 0 for t in samples[name])
               for name in "abc")


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


def test_model_benchmark_nf4_rows_against_peft_on_the_same_4bit_base():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the test extra) is not "
                              "installed")
    if bench.nf4_unavailable():
        pytest.skip(bench.nf4_unavailable())
    variants = ("peft_lora", *bench.NF4_VARIANTS)
    rows = bench.model_benchmark(quick=True, rounds=1, memory=False, variants=variants)
    by_name = {r.variant: r for r in rows}
    assert set(by_name) == set(variants)
    assert by_name["peft_lora+nf4"].ratio_to_peft == pytest.approx(1.0)
    moa_row = by_name["soft_moa/torch+nf4"]
    assert moa_row.trainable > 0 and moa_row.step_ms > 0 and math.isfinite(moa_row.ratio_to_peft)
    assert math.isnan(moa_row.ratio_to_frozen)  # no frozen+nf4 variant in this run
    assert moa_row.ratio_to_peft_low <= moa_row.ratio_to_peft <= moa_row.ratio_to_peft_high
    assert "soft_moa/torch+nf4" in bench.format_model_table(rows)
    # The same trainable tensors as on the plain base; the linears are 4-bit layers.
    assert by_name["peft_lora+nf4"].trainable == by_name["peft_lora"].trainable
    model, _ = bench.build_variant("soft_moa/torch+nf4", bench.MODEL_QUICK,
                                   torch.device("cpu"))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and not any(m.support_avx512bf16_for_cpu for m in quantized)


def test_model_benchmark_skips_nf4_rows_with_a_reason(monkeypatch):
    monkeypatch.setattr(bench, "nf4_unavailable", lambda: "bitsandbytes is not installed")
    messages = []
    rows = bench.model_benchmark(quick=True, rounds=1, memory=False,
                                 variants=("peft_lora", "peft_lora+nf4"),
                                 log=messages.append)
    assert [r.variant for r in rows] == ["peft_lora"]
    assert messages and "bitsandbytes is not installed" in messages[0]


def test_compile_benchmark_rows_beside_eager_with_compile_time_and_memory():
    rows = bench.compile_benchmark(quick=True, rounds=1, memory=False, backend="aot_eager",
                                   variants=("peft_lora", "soft_moa/torch"))
    by_name = {r.variant: r for r in rows}
    peft, moa_row = by_name["peft_lora"], by_name["soft_moa/torch"]
    assert peft.eager_ratio_to_peft == pytest.approx(1.0)
    assert peft.compiled_ratio_to_peft == pytest.approx(1.0)
    for row in rows:
        assert row.eager_ms > 0 and row.compiled_ms > 0 and row.compile_s > 0
        assert math.isfinite(row.speedup) and math.isnan(row.eager_peak_mb)
    assert math.isfinite(moa_row.compiled_ratio_to_peft)
    assert "soft_moa/torch" in bench.format_compiled_table(rows)
    peak = bench._memory_in_subprocess("soft_moa/torch", quick=True,
                                       device=torch.device("cpu"), compiled=True,
                                       backend="aot_eager")
    assert peak > 0


def test_decode_benchmark_eager_and_compiled_rows_against_peft_decoding_the_same_way():
    rows = bench.decode_benchmark(quick=True, rounds=1, names=("peft_lora", "soft_moa/torch"),
                                  backend="aot_eager", new_tokens=4, prompt=8, batch=2)
    by_name = {r.variant: r for r in rows}
    assert set(by_name) == {"peft_lora", "peft_lora/compiled", "soft_moa/torch",
                            "soft_moa/torch/compiled"}
    for name in ("peft_lora", "peft_lora/compiled"):
        assert by_name[name].ratio_to_peft == pytest.approx(1.0)
        assert by_name[name].call_ratio_to_peft == pytest.approx(1.0)
    for row in rows:
        assert row.call_ms > 0 and math.isfinite(row.call_ratio_to_peft)
        assert math.isfinite(row.first_call_s) == row.variant.endswith("/compiled")
    assert "soft_moa/torch/compiled" in bench.format_decode_table(rows)
