"""The backend registry (moa_kernels/contract.py) drives every backend choice, and the entry
checks it holds are the same, word for word, from every backend."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from torch import nn

from moa import MoALinear, RouterConfig
from moa_kernels import backends, contract, torch_ops
from moa_kernels.layout import ExpertLayout

ALL_BACKENDS = list(contract.BACKENDS)  # reference, torch, triton (the interpreter on CPU)


def contract_inputs(tokens: int = 5, in_features: int = 8, out_features: int = 6) -> dict:
    """A valid call of the contract on fresh random data: x, a plain linear base, two
    experts, gates from outside."""
    layout = ExpertLayout.from_specs(MoALinear(nn.Linear(in_features, out_features),
                                               ["lora:2", "adapter:3"], None).specs,
                                     in_features, out_features)
    bias_rows = layout.shrink_rows - layout.bias_start
    return {
        "x": torch.randn(tokens, in_features),
        "base_weight": torch.randn(out_features, in_features),
        "base_bias": torch.randn(out_features),
        "layout": layout,
        "shrink_weight": torch.randn(layout.shrink_rows, in_features),
        "shrink_bias": torch.randn(bias_rows),
        "expand_weight": torch.randn(out_features, layout.expand_columns),
        "expand_bias": torch.randn(layout.num_adapters, out_features),
        "gates": torch.rand(tokens, layout.num_experts),
    }


def call(name: str, inputs: dict):
    inputs = dict(inputs)
    x = inputs.pop("x")
    return backends.moa_linear_of(name, x)(x, **inputs)


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_a_valid_call_runs_on_every_backend_and_agrees_with_the_reference(name):
    # the checks below fail on bad input only: the same inputs, valid, run everywhere
    inputs = contract_inputs()
    y, gates = call(name, inputs)
    expected, _ = call("reference", inputs)
    scale = expected.norm()
    assert scale > 1e-3
    assert (y - expected).norm() / scale < 1e-5
    assert torch.equal(gates, inputs["gates"])


def _both_bases(inputs):
    inputs["base_output"] = torch.randn(inputs["x"].shape[0], inputs["base_weight"].shape[0])


def _no_base(inputs):
    del inputs["base_weight"], inputs["base_bias"]


def _misshaped_base_output(inputs):
    _no_base(inputs)
    inputs["base_output"] = torch.randn(inputs["x"].shape[0] + 1, 6)


def _no_gate_source(inputs):
    del inputs["gates"]


def _gates_one_expert_short(inputs):
    inputs["gates"] = inputs["gates"][:, :-1]


def _gates_one_token_short(inputs):
    inputs["gates"] = inputs["gates"][:-1]


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("spoil, message", [
    (_both_bases, "give exactly one of base_output \\(any base\\) and base_weight"),  # both
    (_no_base, "give exactly one of base_output \\(any base\\) and base_weight"),  # neither
    (_misshaped_base_output, "base_output has shape \\(6, 6\\), x has \\(5, 8\\): their "
                             "leading dimensions must agree"),  # base_output of other tokens
    (_no_gate_source, "moa_linear needs a router or gates"),  # no router, no gates
    (_gates_one_expert_short, "gates must have shape \\(5, 2\\), got \\(5, 1\\)"),  # [T, E-1]
    (_gates_one_token_short, "gates must have shape \\(5, 2\\), got \\(4, 2\\)"),  # [T-1, E]
])
def test_the_shared_entry_checks_raise_the_same_message_from_every_backend(name, spoil,
                                                                           message):
    inputs = contract_inputs()
    spoil(inputs)
    with pytest.raises(ValueError, match=message):
        call(name, inputs)


@pytest.mark.parametrize("dtype, device, interpreted, message", [
    # a dtype outside the registry's list for triton
    (torch.float64, "cpu", "1", "backend 'triton' supports float32, float16 and bfloat16 "
                                "inputs, got torch.float64; use backend 'torch' for other"),
    # a device triton runs on only under the interpreter, without it
    (torch.float32, "cpu", "0", "backend 'triton' runs on CUDA tensors, or on the CPU under "
                                "the Triton interpreter \\(TRITON_INTERPRET=1 set before "
                                "triton is imported\\); got a cpu tensor. Use backend 'torch'"),
])
def test_the_device_and_dtype_checks_come_from_the_registry(monkeypatch, dtype, device,
                                                           interpreted, message):
    monkeypatch.setenv("TRITON_INTERPRET", interpreted)
    x = torch.randn(3, 4, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=message):
        backends.moa_linear_of("triton", x)
    with pytest.raises(ValueError, match=message):  # the backend's own entry checks too
        contract.check_triton_input(x)
    for name, info in contract.BACKENDS.items():  # the backends without limits take it
        if info.devices is None and info.dtypes is None:
            contract.check_backend_input(name, x)


def test_an_unknown_name_lists_the_allowed_ones(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'; allowed: reference, "
                                         "torch, triton$"):
        contract.backend_info("cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'; allowed: auto, "
                                         "reference, torch, triton$"):
        MoALinear(nn.Linear(4, 3), ["lora:2"], backend="cuda")
    monkeypatch.setenv("MOA_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown MOA_BACKEND 'fast'; allowed: auto, "
                                         "reference, torch, triton$"):
        backends.select_backend("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend option 'fused'; allowed: "
                                         "input_recipe, shrink_output, stacked_any_dtype$"):
        contract.accepts("torch", "fused")


def test_every_registered_module_is_reached_by_the_lookup():
    x = torch.randn(2, 4)
    for name, info in contract.BACKENDS.items():
        assert backends.available(name)
        entry = importlib.import_module(info.module).moa_linear
        assert backends.moa_linear_of(name, x) is entry


def spy_torch_backend(monkeypatch) -> list[dict]:
    """The keyword arguments of every call of the torch backend."""
    received, original = [], torch_ops.moa_linear

    def spy(x, **kwargs):
        received.append(kwargs)
        return original(x, **kwargs)

    monkeypatch.setattr(torch_ops, "moa_linear", spy)
    return received


def without_options(monkeypatch, name: str, *options: str) -> None:
    info = contract.BACKENDS[name]
    monkeypatch.setitem(contract.BACKENDS, name, dataclasses.replace(
        info, accepts=info.accepts - set(options)))


@pytest.mark.parametrize("accepted", [True, False])  # torch as registered; without the option
def test_an_input_recipe_reaches_only_a_backend_that_accepts_it(monkeypatch, accepted):
    layer = MoALinear(nn.Linear(8, 4), ["lora:2"], RouterConfig(), backend="torch")
    with torch.no_grad():
        layer.expand_weight.normal_()
    if not accepted:
        without_options(monkeypatch, "torch", contract.INPUT_RECIPE)
    received = spy_torch_backend(monkeypatch)
    source = torch.randn(3, 8)
    x = source * 2
    layer.next_input_recipe = (x, torch_ops.InputRecipe(lambda t: t * 2, (source,)))
    y = layer(x)
    assert (contract.INPUT_RECIPE in received[0]) is accepted
    layer.next_input_recipe = None
    assert torch.equal(y, layer(x))  # the recipe changes what is saved, never the result


@pytest.mark.parametrize("accepted", [True, False])  # torch as registered; without the option
def test_a_shrink_output_reaches_only_a_backend_that_accepts_it(monkeypatch, accepted):
    layer = MoALinear(nn.Linear(8, 4), ["lora:2", "lora:3"], None, backend="torch")
    x, gates = torch.randn(3, 8), torch.rand(3, 2)
    with torch.no_grad():
        layer.expand_weight.normal_()
    shrink_output = x @ layer.shrink_weight.T
    layer.gate_source = lambda _: (gates, False, shrink_output)
    if not accepted:
        without_options(monkeypatch, "torch", contract.SHRINK_OUTPUT)
    received = spy_torch_backend(monkeypatch)
    y = layer(x)
    assert (contract.SHRINK_OUTPUT in received[0]) is accepted
    layer.gate_source = None
    expected = layer(x, gates)
    assert (y - expected).norm() / expected.norm() < 1e-6


@pytest.mark.parametrize("accepted", [True, False])  # a backend that casts itself; one that not
def test_stacked_weights_in_another_dtype_reach_only_a_backend_that_accepts_them(
        monkeypatch, accepted):
    class Hooked(nn.Linear):  # not a plain linear: x may have another dtype than the weight
        def forward(self, x):
            return super().forward(x.to(self.weight.dtype)).to(x.dtype)

    layer = MoALinear(Hooked(8, 4), ["lora:2"], RouterConfig(), backend="torch",
                      adapter_dtype=torch.float32)
    info = contract.BACKENDS["torch"]
    if accepted:
        monkeypatch.setitem(contract.BACKENDS, "torch", dataclasses.replace(
            info, accepts=info.accepts | {contract.STACKED_ANY_DTYPE}))
    received, original = [], torch_ops.moa_linear

    def spy(x, **kwargs):  # records, then runs the backend on x's dtype
        received.append(kwargs["shrink_weight"])
        for key in ("shrink_weight", "shrink_bias", "expand_weight", "expand_bias"):
            kwargs[key] = kwargs[key].to(x.dtype)
        return original(x, **kwargs)

    monkeypatch.setattr(torch_ops, "moa_linear", spy)
    layer(torch.randn(3, 8, dtype=torch.float64))
    assert (received[0] is layer.shrink_weight) is accepted
    assert received[0].dtype == (torch.float32 if accepted else torch.float64)


def test_the_oracle_flag_picks_the_routers_reference_gates(monkeypatch):
    layer = MoALinear(nn.Linear(8, 4), ["lora:2", "lora:3"], RouterConfig(), backend="torch")
    calls = []
    original = type(layer.router).reference_gates

    def spy(router, x):
        calls.append(x.shape)
        return original(router, x)

    monkeypatch.setattr(type(layer.router), "reference_gates", spy)
    x = torch.randn(3, 8)
    layer.route(x)
    assert calls == []  # torch: the fused router
    monkeypatch.setitem(contract.BACKENDS, "torch",
                        dataclasses.replace(contract.BACKENDS["torch"], oracle=True))
    layer.route(x)
    assert calls == [(3, 8)]


def test_auto_takes_the_first_backend_the_registry_lets_it_pick(monkeypatch):
    monkeypatch.delenv("MOA_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert backends.select_backend("auto", cpu) == "torch"
    for name in contract.AUTO_ORDER:  # none may be picked: auto says so
        monkeypatch.setitem(contract.BACKENDS, name,
                            dataclasses.replace(contract.BACKENDS[name], auto=False))
    with pytest.raises(ValueError, match="no backend that auto may pick runs on cpu"):
        backends.select_backend("auto", cpu)
    # triton allowed: still never on the CPU, where it runs only under the interpreter
    monkeypatch.setitem(contract.BACKENDS, "triton",
                        dataclasses.replace(contract.BACKENDS["triton"], auto=True))
    with pytest.raises(ValueError, match="no backend that auto may pick runs on cpu"):
        backends.select_backend("auto", cpu)
