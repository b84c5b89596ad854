"""torch.compile(fullgraph=True) of every preset on the torch backend: a training step and
`generate` with a static KV cache trace as one graph each (fullgraph raises on any graph
break) and give what eager gives.

Every preset runs under the "aot_eager" backend: dynamo's trace (the part that breaks
graphs) and AOTAutograd's joint forward/backward graph, without inductor's code generation,
which takes minutes per model on 2 CPU cores. Those comparisons run in float64, so that
they test the math and not float32 rounding: the compiled sparse modes run the masked dense
path where eager runs the routing plan, and a router gradient summed over tokens can
cancel to a few 1e-4 of float32 noise. A few slow tests compile soft_moa and sparse_moa
with inductor, the real compiler, in float32.

The triton backend is not compiled here: it needs CUDA (its ops are torch.library custom
ops with fake implementations, so they trace; tests/moa_kernels/test_triton_compile.py
compiles a MoALinear on it under the interpreter).
"""

import pytest
import torch
import torch._dynamo
from transformers import CompileConfig

from moa import MoAConfig, get_moa_model
from moa.config import PRESETS
from tests.conftest import relative_error
from tests.moa.tiny import perturb, tiny_llama, token_batch

PRESET_NAMES = sorted(PRESETS)
# float64 traces (aot_eager): equal up to rounding in another summation order
TOLERANCE_FLOAT64 = 1e-9
TOLERANCE_FLOAT32 = 1e-4  # inductor, float32: fused kernels sum in another order


def moa_model(preset: str, dtype: torch.dtype = torch.float64):
    """A one-layer tiny Llama with `preset` on the torch backend, every MoA tensor moved off
    its initial value (LoRA B and the prompt gates start at zero)."""
    model = get_moa_model(tiny_llama(num_hidden_layers=1),
                          MoAConfig.preset(preset, backend="torch"))
    perturb(model, scale=0.3)
    return model.to(dtype)


def reset_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the graph counts


def loss_and_gradients(model, step, ids):
    loss = step(ids)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.moa_named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_training_step_compiles(preset: str, backend: str, dtype: torch.dtype,
                                  tolerance: float) -> None:
    model = moa_model(preset, dtype).train()
    ids = token_batch(2, 9)

    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    reset_dynamo()
    eager_loss, eager_grads = loss_and_gradients(model, step, ids)
    compiled = torch.compile(step, fullgraph=True, backend=backend)  # raises on a break
    loss, grads = loss_and_gradients(model, compiled, ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert relative_error(loss, eager_loss) < tolerance
    assert set(grads) == set(eager_grads) and len(grads) > 2
    for name, grad in grads.items():
        assert eager_grads[name].norm() > 0, f"{preset} {name}: the comparison needs a gradient"
        error = relative_error(grad, eager_grads[name])
        assert error < tolerance, f"{preset} {name}: relative error {error:.2e}"


def assert_generate_compiles(preset: str, backend: str, dtype: torch.dtype,
                             tolerance: float) -> None:
    """transformers compiles the decoding steps of a static-cache generate (compile_config;
    the prefill runs eager)."""
    model = moa_model(preset, dtype).eval()
    ids = token_batch(2, 6)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                  min_new_tokens=4, do_sample=False, pad_token_id=0,
                  cache_implementation="static", return_dict_in_generate=True,
                  output_logits=True)
    config = CompileConfig(fullgraph=True, backend=backend,
                           mode="default" if backend == "inductor" else None)
    config._compile_all_devices = True  # transformers compiles on CUDA only by default
    reset_dynamo()
    with torch.no_grad():
        eager = model.generate(**kwargs, disable_compile=True)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
        compiled = model.generate(**kwargs, compile_config=config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert torch.equal(compiled.sequences, eager.sequences)
    for step, (got, expected) in enumerate(zip(compiled.logits, eager.logits)):
        error = relative_error(got, expected)
        assert error < tolerance, f"{preset} decoding step {step}: relative error {error:.2e}"


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_training_step_compiles_as_one_graph(preset):
    assert_training_step_compiles(preset, "aot_eager", torch.float64, TOLERANCE_FLOAT64)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_static_cache_generate_compiles_as_one_graph(preset):
    assert_generate_compiles(preset, "aot_eager", torch.float64, TOLERANCE_FLOAT64)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["soft_moa", "sparse_moa"])
def test_training_step_compiles_with_inductor(preset):
    assert_training_step_compiles(preset, "inductor", torch.float32, TOLERANCE_FLOAT32)


@pytest.mark.slow
def test_static_cache_generate_compiles_with_inductor():
    assert_generate_compiles("soft_moa", "inductor", torch.float32, TOLERANCE_FLOAT32)
