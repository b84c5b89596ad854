"""moa_kernels/activations.py: the one activation table (name, code, function, derivative).

The codes are saved in every adapter file (moa.modules.linear.expert_signature), so they
are pinned here; every backend reads the functions and derivatives from the table, so they
are checked against autograd on fresh random data.
"""

import pytest
import torch

import moa.config
from moa_kernels.activations import (
    ACTIVATION_NAMES,
    ACTIVATIONS,
    activation_by_code,
    activation_by_name,
)

BY_NAME = {a.name: a for a in ACTIVATIONS}


def test_the_saved_codes_never_change():
    # adapters saved by earlier versions carry these codes in their expert_signature
    assert {a.name: a.code for a in ACTIVATIONS} == {"identity": 0, "silu": 1, "gelu": 2,
                                                     "relu": 3}


def test_names_and_codes_are_unique():
    assert len({a.name for a in ACTIVATIONS}) == len({a.code for a in ACTIVATIONS}) == \
        len(ACTIVATIONS)


def test_the_config_lists_the_tables_names_in_the_users_order():
    assert moa.config.ACTIVATIONS == ACTIVATION_NAMES == ("silu", "gelu", "relu", "identity")


@pytest.mark.parametrize("name", ACTIVATION_NAMES)  # every activation of the table
def test_every_activation_round_trips_by_name_and_by_code(name):
    activation = activation_by_name(name)
    assert activation.name == name
    assert activation_by_code(activation.code) is activation


@pytest.mark.parametrize("name", [
    "tanh",  # a real activation the table does not have
    "SiLU",  # a known name in another case
    "",  # empty
    None,  # not a string
])
def test_an_unknown_name_raises_naming_the_allowed_ones(name):
    with pytest.raises(ValueError, match=r"unknown activation .*allowed: silu, gelu, relu, "
                                         r"identity"):
        activation_by_name(name)


@pytest.mark.parametrize("code", [
    4,  # one past the largest code
    -1,  # negative
    True,  # a bool, although True == 1
    "1",  # a known code as a string
    1.0,  # a known code as a float
])
def test_an_unknown_code_raises_naming_the_allowed_ones(code):
    with pytest.raises(ValueError, match=r"unknown activation code .*allowed: 0 \(identity\), "
                                         r"1 \(silu\), 2 \(gelu\), 3 \(relu\)"):
        activation_by_code(code)


@pytest.mark.parametrize("name", ACTIVATION_NAMES)  # every activation of the table
def test_function_and_derivative_match_torch_and_autograd(name):
    activation = BY_NAME[name]
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 3
    grad = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    expected = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
                "relu": torch.relu, "identity": lambda h: h}[name]
    torch.testing.assert_close(activation.function(hidden), expected(hidden), rtol=0, atol=0)
    leaf = hidden.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(expected(leaf), leaf, grad)
    torch.testing.assert_close(activation.derivative(grad, hidden), autograd, rtol=1e-12,
                               atol=1e-12)


def test_relu_derivative_is_zero_at_zero_as_torch():
    # the degenerate point: a kink, where torch takes the derivative 0
    hidden, grad = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert torch.equal(activation_by_name("relu").derivative(grad, hidden), torch.zeros(4,
                       dtype=torch.float64))
