"""MoALinear over any base: quantized (bitsandbytes nf4 and int8, torchao int8 weight-only),
hooked and subclassed linears are called as modules and the backends add only the mixture.

Each quantized base is held against an nn.Linear holding its effective (dequantized)
weight: the outputs, and the gradients of x and of every trainable tensor, must agree on
every backend and in soft and sparse modes. Model level: a small Llama whose linears are
bitsandbytes 4-bit layers, as `from_pretrained` with a quantization_config builds it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moa import MoAConfig, MoALinear, MoAModel, RouterConfig, get_moa_model
from moa.config import PRESETS
from moa.modules.dispatch import is_plain_linear
from tests.conftest import relative_error
from tests.moa.tiny import perturb, tiny_llama, token_batch

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
# Only the tests that build a bitsandbytes layer skip without it (the hooked, subclassed and
# torchao bases, disable_adapters and the merge of tied weights run anyway).
needs_bitsandbytes = pytest.mark.skipif(
    bnb is None, reason="needs bitsandbytes (the test extra), which is not installed")

IN, OUT, TOKENS = 24, 20, 13
EXPERTS = ["lora:4", "lora:8:16", "adapter:6:gelu"]
BACKENDS = ["reference", "torch", "triton"]
MODES = [
    RouterConfig(mode="soft"),  # every pair runs
    RouterConfig(mode="threshold", max_threshold=0.5),  # Sparse MoA: pairs skipped
    RouterConfig(kind="linear", gate="softmax", mode="topk", top_k=2),  # top-2 of 3
]
# fp32 everywhere: the quantized and the plain base differ by the rounding of one GEMM.
TOLERANCE = 1e-5


def plain_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


def nf4_base(linear: nn.Linear) -> tuple[nn.Module, nn.Linear]:
    """A bitsandbytes nf4 Linear4bit of `linear`, and the nn.Linear of its dequantized
    weight."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(linear.weight.detach(), quant_type="nf4")
    base = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=torch.float32,
                             quant_type="nf4")
    base.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state,
                                    quant_type="nf4", bnb_quantized=True, module=base)
    base.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return base, plain_linear(dequantize_4bit(packed, state), linear.bias.detach())


def int8_base(linear: nn.Linear) -> tuple[nn.Module, nn.Linear]:
    """A bitsandbytes Linear8bitLt (int8 weights, per-row scales) of `linear`, and the
    nn.Linear of its dequantized weight."""
    base = bnb.nn.Linear8bitLt(IN, OUT, bias=True, has_fp16_weights=False, threshold=0.0)
    base.load_state_dict(linear.state_dict())
    base = base.to("cpu")  # quantizes
    assert base.weight.dtype == torch.int8
    weight = base.weight.data.float() * base.weight.SCB[:, None].float() / 127
    return base, plain_linear(weight, linear.bias.detach())


def torchao_base(linear: nn.Linear) -> tuple[nn.Module, nn.Linear]:
    """A torchao int8 weight-only linear (a tensor-subclass weight) of `linear`, and the
    nn.Linear of its dequantized weight."""
    torchao = pytest.importorskip("torchao", reason="torchao (the test extra) is not "
                                  "installed")
    holder = nn.Sequential(plain_linear(linear.weight.detach(), linear.bias.detach()))
    torchao.quantization.quantize_(holder, torchao.quantization.Int8WeightOnlyConfig())
    base = holder[0]
    return base, plain_linear(base.weight.dequantize(), linear.bias.detach())


QUANTIZED = {"nf4": nf4_base, "int8": int8_base, "torchao-int8": torchao_base}
QUANTIZED_KINDS = [pytest.param("nf4", marks=needs_bitsandbytes),
                   pytest.param("int8", marks=needs_bitsandbytes),
                   "torchao-int8"]  # torchao's own skip, in torchao_base


def run(layer: MoALinear, x: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
    """y, dx and the gradient of every trainable tensor under a fixed random upstream."""
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    y = layer(leaf)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * upstream).sum().backward()
    result = {"y": y.detach(), "x.grad": leaf.grad}
    for name, param in layer.named_parameters():
        if param.requires_grad and param.grad is not None:
            result[name] = param.grad
    return result


def twin_layers(base: nn.Module, plain: nn.Linear, router: RouterConfig):
    torch.manual_seed(3)
    quantized = MoALinear(base, EXPERTS, router)
    reference = MoALinear(plain, EXPERTS, router)
    with torch.no_grad():  # move B (zero at init) so that every expert matters
        for layer in (quantized, reference):
            for name, param in layer.named_parameters():
                if not name.startswith("base."):  # every MoA tensor, frozen thresholds too
                    param.copy_(torch.randn(param.shape,
                                            generator=torch.Generator().manual_seed(9)) * 0.3)
    return quantized, reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", MODES, ids=["soft", "threshold", "topk"])
@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
def test_quantized_base_equals_its_dequantized_linear(kind, router, backend):
    torch.manual_seed(0)
    base, plain = QUANTIZED[kind](nn.Linear(IN, OUT))
    assert not is_plain_linear(base)  # called as a module, not read as weights
    quantized, reference = twin_layers(base, plain, router)
    x = torch.randn(TOKENS, IN, generator=torch.Generator().manual_seed(1))
    actual, expected = run(quantized, x, backend), run(reference, x, backend)
    assert set(actual) == set(expected) and len(actual) > 4
    for name in expected:
        assert expected[name].norm() > 1e-3, f"{name}: the comparison needs a non-zero scale"
        error = relative_error(actual[name], expected[name])
        assert error < TOLERANCE, f"{kind} {backend} {name}: relative error {error:.2e}"
    if router.mode != "soft":  # the sparse modes really skipped pairs
        assert (quantized.last_gates == 0).any()


def test_hooked_and_subclassed_bases_keep_their_behaviour():
    torch.manual_seed(0)
    plain = nn.Linear(IN, OUT)
    x = torch.randn(5, IN)

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(IN, OUT)
    doubled.load_state_dict(plain.state_dict())
    hooked = nn.Linear(IN, OUT)
    hooked.load_state_dict(plain.state_dict())
    hooked.register_forward_hook(lambda module, args, out: 2 * out)
    pre_hooked = nn.Linear(IN, OUT)
    pre_hooked.load_state_dict(plain.state_dict())
    pre_hooked.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    with torch.no_grad():
        twice = 2 * plain(x)
        twice_input = plain(2 * x)
    for base, expected_base in ((doubled, twice), (hooked, twice), (pre_hooked, twice_input)):
        layer = MoALinear(base, ["lora:4"], router=None)
        with torch.no_grad():
            layer.expert_parameters()[0]["lora_B"].normal_()
            delta = layer.expert_parameters()[0]["lora_B"] @ \
                layer.expert_parameters()[0]["lora_A"]
            y = layer(x, torch.ones(5, 1))
        expected = expected_base + x @ delta.t()
        assert relative_error(y, expected) < 1e-6, type(base).__name__


def test_a_forward_set_on_the_instance_is_called():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    x = torch.randn(5, IN)
    with torch.no_grad():
        twice = 2 * base(x)
    class_forward = base.forward
    base.forward = lambda inputs: 2 * class_forward(inputs)  # as accelerate's hooks do
    assert not is_plain_linear(base)
    layer = MoALinear(base, ["lora:4"], router=None)
    with torch.no_grad():
        layer.expert_parameters()[0]["lora_B"].normal_()
        delta = layer.expert_parameters()[0]["lora_B"] @ layer.expert_parameters()[0]["lora_A"]
        y = layer(x, torch.ones(5, 1))
    assert relative_error(y, twice + x @ delta.t()) < 1e-6


@pytest.mark.parametrize("preset", ["soft_moa", "molora"], ids=["layer-router", "module-router"])
def test_accelerate_hooks_that_only_place_tensors_keep_the_outputs(preset):
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    ids = token_batch()
    plain, hooked = tiny_llama(), tiny_llama()
    for module in hooked.modules():  # a hook per module, as device maps place them
        if isinstance(module, nn.Linear):
            accelerate_hooks.add_hook_to_module(
                module, accelerate_hooks.AlignDevicesHook(execution_device="cpu"))
    outputs = []
    for model in (plain, hooked):
        torch.manual_seed(4)  # the same adapters for both
        moa = get_moa_model(model, MoAConfig.preset(preset))
        perturb(moa)
        with torch.no_grad():
            outputs.append(moa(input_ids=ids).logits)
    assert outputs[0].abs().max() > 1e-2
    assert relative_error(outputs[1], outputs[0]) < 1e-6


def test_an_offloaded_model_is_refused_at_injection_and_left_as_it_was():
    accelerate = pytest.importorskip("accelerate")
    ids = token_batch()
    model = tiny_llama()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))  # weights on meta
    with pytest.raises(ValueError, match=r"accelerate offloads the weights of \d+ modules of "
                       r"this model \(such as 'model.embed_tokens'\).*cannot be injected "
                       r"into an offloaded model; keep the model on devices"):
        get_moa_model(model, MoAConfig.preset("lora"))  # it computed NaN from empty tensors
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert relative_error(model(input_ids=ids).logits, expected) < 1e-6


@pytest.mark.parametrize("preset", ["soft_moa", "lora"], ids=["layer-router", "no-router"])
def test_offloading_after_injection_is_refused_at_the_call(preset):
    accelerate = pytest.importorskip("accelerate")
    moa = get_moa_model(tiny_llama(), MoAConfig.preset(preset))
    accelerate.cpu_offload(moa, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="this MoALinear runs under an accelerate hook that "
                       "offloads its weights .* which MoA does not support"):
        moa(input_ids=token_batch())


@needs_bitsandbytes
def test_adapter_dtype_and_output_dtype_beside_a_4bit_base():
    torch.manual_seed(0)
    base, _ = nf4_base(nn.Linear(IN, OUT))
    assert MoALinear(base, ["lora:4"]).shrink_weight.dtype == torch.float32  # default
    base.compute_dtype = torch.bfloat16
    layer = MoALinear(base, ["lora:4"], adapter_dtype="base")
    assert layer.shrink_weight.dtype == torch.bfloat16  # the base's compute dtype
    x = torch.randn(3, IN)
    assert layer(x).dtype == base(x).dtype == torch.float32  # the base output's dtype
    with pytest.raises(ValueError, match="does not say what dtype it computes in"):
        MoALinear(int8_base(nn.Linear(IN, OUT))[0], ["lora:4"], adapter_dtype="base")


def test_a_torchao_base_trains():
    # It used to fail on the first backward: "Output 0 of _BaseAndShrink is a view and is
    # being modified inplace" (the in-place gated expand over a tensor-subclass weight).
    torch.manual_seed(0)
    base, _ = torchao_base(nn.Linear(IN, OUT))
    layer = MoALinear(base, EXPERTS)
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(32, IN), torch.randn(32, OUT)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


# ---------------------------------------------------------------------------------------
# a 4-bit Llama, as from_pretrained(quantization_config=...) builds it
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("llama"))
    tiny_llama(seed=0).save_pretrained(directory)
    return directory


def load_4bit(directory: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config,
                                                 device_map="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first
            # no-grad eval call, which fails for in_features 96 (bitsandbytes 0.50.2) and
            # rounds differently: keep every CPU on the one portable kernel.
            module.support_avx512bf16_for_cpu = False
    return model.eval()


@needs_bitsandbytes
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains_saves_and_disables_on_a_4bit_llama(preset, llama_checkpoint,
                                                                tmp_path):
    base_model = load_4bit(llama_checkpoint)
    ids = token_batch(batch=4, length=12)
    with torch.no_grad():
        base_logits = base_model(input_ids=ids).logits
    torch.manual_seed(0)
    moa = get_moa_model(base_model, MoAConfig.preset(preset))
    optimizer = torch.optim.AdamW([p for p in moa.parameters() if p.requires_grad], lr=1e-2)
    moa.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = moa(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, f"{preset}: {losses}"
    moa.eval()
    with torch.no_grad():
        trained = moa(input_ids=ids).logits
        with moa.disable_adapters():
            assert torch.equal(moa(input_ids=ids).logits, base_logits)
    assert relative_error(trained, base_logits) > 1e-3  # the adapters matter
    moa.save_pretrained(tmp_path)
    reloaded = MoAModel.from_pretrained(load_4bit(llama_checkpoint), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)


@needs_bitsandbytes
def test_prompt_expert_reads_4bit_projections(llama_checkpoint):
    # The prompt keys and values come from the frozen k_proj and v_proj: a 4-bit base is
    # called as a module (its packed uint8 weight cannot be read as a matrix).
    moa = get_moa_model(load_4bit(llama_checkpoint), MoAConfig.preset("soft_moa"))
    perturb(moa)
    ids = token_batch()
    moa.train()
    loss = moa(input_ids=ids, labels=ids).loss
    loss.backward()
    prompt = moa.model.model.layers[0].self_attn.moa_prompt
    assert prompt.prompt.grad is not None and prompt.prompt.grad.norm() > 0
    assert prompt.gate.grad.norm() > 0


# ---------------------------------------------------------------------------------------
# disable_adapters keeps the module tree: module-wide calls reach every MoA module
# ---------------------------------------------------------------------------------------

def test_module_wide_calls_inside_disable_adapters_reach_every_moa_module():
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("soft_moa", dropout=0.1))
    moa_names = set(moa.moa_state_dict())
    layers = [m for m in moa.modules() if isinstance(m, MoALinear)]
    assert layers
    with moa.disable_adapters():
        moa.eval()
        assert all(not m.training for m in moa.modules())
        moa.train()
        assert all(m.training for m in moa.modules())
        moa.to(torch.float64)
        names = {n for n, p in moa.model.named_parameters()}
        state = moa.model.state_dict()
    assert moa_names <= names
    assert moa_names <= set(state)
    assert all(p.dtype == torch.float64 for p in moa.parameters())
    assert all(layer.shrink_weight.dtype == torch.float64 for layer in layers)
    ids = token_batch()
    moa.eval()
    with torch.no_grad():
        with moa.disable_adapters():
            plain = moa(input_ids=ids).logits
        assert moa(input_ids=ids).logits.dtype == plain.dtype == torch.float64


# ---------------------------------------------------------------------------------------
# merge_and_unload: refused where merging would be wrong
# ---------------------------------------------------------------------------------------

def test_merge_refuses_tied_weights_and_leaves_the_model_unchanged():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    moa = get_moa_model(model, MoAConfig.preset("lora", target_modules=["q_proj", "lm_head"]))
    perturb(moa)
    ids = token_batch()
    with torch.no_grad():
        before = moa(input_ids=ids).logits
        embeddings = model.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match=r"lm_head's weight is shared with "
                                         r"model\.embed_tokens\.weight.*Untie"):
        moa.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens.weight, embeddings)
        assert torch.equal(moa(input_ids=ids).logits, before)


@needs_bitsandbytes
def test_merge_refuses_a_quantized_base(llama_checkpoint):
    moa = get_moa_model(load_4bit(llama_checkpoint), MoAConfig.preset("lora"))
    with pytest.raises(ValueError, match=r"quantized base \(Linear4bit.*requantizing"):
        moa.merge_and_unload()
    assert any(isinstance(m, MoALinear) for m in moa.modules())  # nothing was unloaded


@needs_bitsandbytes
@pytest.mark.parametrize("adapter_dtype, expected", [
    (None, torch.float32),  # default beside a 4-bit base
    ("base", torch.bfloat16),  # bnb_4bit_compute_dtype
    ("float64", torch.float64),  # explicit
])
def test_moa_config_adapter_dtype(adapter_dtype, expected, llama_checkpoint):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(llama_checkpoint, quantization_config=config,
                                                 device_map="cpu")
    moa = get_moa_model(model, MoAConfig.preset("soft_moa", adapter_dtype=adapter_dtype))
    assert {p.dtype for _, p in moa.moa_named_parameters()} == {expected}


def test_moa_config_adapter_dtype_is_checked():
    with pytest.raises(ValueError, match="unknown adapter_dtype 'fp8'; allowed: base, float32"):
        MoAConfig(adapter_dtype="fp8")
