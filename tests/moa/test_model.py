"""get_moa_model / MoAModel on tiny random-weight models: the paper topology (layer router
slices, parallel adapter, prompt expert) against hand computations, the initial bound,
generation with a KV cache, auxiliary loss, stats, strict loading, and compatibility with
Trainer, gradient checkpointing and bf16."""

import contextlib
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Trainer,
    TrainingArguments,
)

from moa import MoAConfig, MoALinear, MoAModel, RouterConfig, get_moa_model
from moa.families import FAMILIES, rotary_function
from moa.model import MOA_MODULES, WEIGHTS_NAME
from moa.modules import layer_router, parallel_adapter, prompt
from moa.modules.aux_loss import GateCollector, load_balancing_loss
from moa.modules.prompt import PromptExpert, prompt_key_cache, rotary_operands, rotate_half_query
from moa_kernels import reference, torch_ops
from moa_kernels.routing import gates_from_first_layer
from tests.conftest import assert_results_match, relative_error
from tests.moa.tiny import (
    VOCAB,
    cache_keyword,
    llama_config,
    perturb,
    tiny_llama,
    token_batch,
)

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_family(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        return tiny_llama(seed)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**SMALL, head_dim=16)).eval()
    if family == "qwen2":  # biases on q, k and v
        return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()
    if family == "qwen3":  # q_norm / k_norm on the head dim
        return Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=16)).eval()
    if family == "gemma":  # (1 + w) RMSNorm, scaled embeddings
        return GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=16)).eval()
    if family == "gemma2":  # pre and post norms around attention and MLP, soft-capping
        return Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=16)).eval()
    raise ValueError(family)


def moa_tensors_and_grads(moa):
    return {name: (param.detach().clone(), param.grad.clone())
            for name, param in moa.moa_named_parameters() if param.grad is not None}


# ---- initialisation ----------------------------------------------------------------------

def test_fresh_lora_and_prompt_experts_add_exactly_nothing():
    # LoRA B and the prompt gates start at zero: without the parallel adapter the injected
    # model is the base model, bit for bit.
    ids = token_batch()
    with torch.no_grad():
        base = tiny_llama()(ids).logits
        moa = get_moa_model(tiny_llama(), MoAConfig(parallel_adapter=None))
        assert torch.equal(moa(ids).logits, base)


def test_fresh_parallel_adapter_is_tiny_but_not_zero_within_its_bound():
    # delta = g * W_up silu(W_down x) (biases zero); g <= 1 and |silu(z)| <= |z|, so per
    # token |delta| <= ||W_up||_2 ||W_down x||; xavier gain 1e-4 makes that bound tiny.
    ids = token_batch(3, 10)
    with torch.no_grad():
        base = tiny_llama()(ids).logits
    moa = get_moa_model(tiny_llama(), MoAConfig())
    seen = []

    def check(mlp, args, output):
        x = args[0]
        adapter = layer_of[mlp].moa_parallel_adapter
        delta = (output - mlp.forward(x)).double()  # forward: the MLP without hooks
        bound = torch.linalg.matrix_norm(adapter.up_weight.double(), ord=2) * \
            F.linear(x.double(), adapter.down_weight.double()).norm(dim=-1)
        seen.append((delta.norm(dim=-1), bound))

    layers = moa.model.model.layers
    layer_of = {layer.mlp: layer for layer in layers}
    handles = [layer.mlp.register_forward_hook(check) for layer in layers]
    with torch.no_grad():
        logits = moa(ids).logits
    for handle in handles:
        handle.remove()
    assert len(seen) == 2
    for delta, bound in seen:
        assert (delta > 0).any()  # not zero ...
        assert (delta <= bound * (1 + 1e-6) + 1e-12).all()  # ... and within the bound
        assert bound.max() < 1e-5
    assert (logits - base).abs().max() < 1e-5


# ---- layer-scope routing -----------------------------------------------------------------

def hand_router(x, router, config: RouterConfig):
    p = {k: v for k, v in router.named_parameters()}
    hidden = F.silu(x @ p["w1_weight"].t() + p["w1_bias"]) * (x @ p["w3_weight"].t() +
                                                               p["w3_bias"])
    prob = torch.sigmoid(hidden @ p["w2_weight"].t() + p["w2_bias"])
    if config.mode == "soft":
        return prob
    threshold = config.max_threshold * torch.sigmoid(x @ p["threshold_weight"].t() +
                                                     p["threshold_bias"])
    return prob * (prob >= threshold)


@pytest.mark.parametrize("preset", ["soft_moa", "sparse_moa"])
def test_each_module_gets_its_slice_of_the_layer_router(preset):
    moa = get_moa_model(tiny_llama(), MoAConfig.preset(preset))
    perturb(moa, scale=0.5)
    normed = {}
    layers = moa.model.model.layers
    for index, layer in enumerate(layers):
        layer.input_layernorm.register_forward_hook(
            lambda m, a, out, index=index: normed.__setitem__(index, out.detach()))
    with torch.no_grad():
        moa(token_batch(3, 8))
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.down_proj"]
    for index, layer in enumerate(layers):
        expected = hand_router(normed[index], layer.moa_router.router,
                               moa.moa_config.router)
        assert expected.shape == (3, 8, 6 if preset == "sparse_moa" else 7)
        assert relative_error(layer.moa_router.last_gates, expected) < 1e-5
        for e, name in enumerate(modules):
            module = layer.get_submodule(name)
            assert isinstance(module, MoALinear) and module.router is None
            assert relative_error(module.last_gates, expected[..., e:e + 1]) < 1e-5
        if preset == "sparse_moa":
            assert 0 < (expected == 0).float().mean() < 1  # some pairs off, some on


def test_a_routed_layer_takes_its_layer_gates_unless_given_gates():
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("sparse_moa"))
    perturb(moa, scale=0.5)
    layer = moa.model.model.layers[0]
    k_proj, router = layer.self_attn.k_proj, layer.moa_router
    assert not k_proj._forward_pre_hooks and not k_proj._forward_hooks  # no hook machinery
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        router.route(layer.input_layernorm(x))
        routed = k_proj(layer.input_layernorm(x))
        assert torch.equal(k_proj.last_gates, router.gates[..., 1:2])
        given = torch.rand(2, 5, 1) + 0.5  # every pair on: differs from the sparse gates
        assert not torch.equal(k_proj(layer.input_layernorm(x), given), routed)
        assert torch.equal(k_proj.last_gates, given)
        k_proj(layer.input_layernorm(x))  # routed again: the router's slice once more
        assert torch.equal(k_proj.last_gates, router.gates[..., 1:2])
        router.active = False  # a switched-off router hands out nothing
        with pytest.raises(ValueError, match="has no router"):
            k_proj(layer.input_layernorm(x))
    moa.unload()
    assert k_proj.gate_source is None


def test_layer_router_splits_its_gates_once_for_its_consumers():
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("soft_moa"))
    router = moa.model.model.layers[0].moa_router
    # five MoALinears, the parallel adapter, the prompt expert: one gate each, in order
    assert router.consumer_slices == tuple((e, e + 1) for e in range(7))
    with torch.no_grad():
        moa(token_batch(2, 5))
    parts = router.gate_parts
    assert list(parts) == list(router.consumer_slices)
    for (start, stop), part in parts.items():
        assert torch.equal(part, router.gates[..., start:stop])
        assert router.gates_for(start, stop, torch.zeros(2, 5, 64), "test") is part
    for bad in ([(0, 3), (4, 7)], [(1, 7)], [(0, 3), (3, 6)], [(0, 0), (0, 7)], []):
        with pytest.raises(ValueError, match="do not tile the 7 experts"):
            router.split_for(bad)


# ---- the prompt expert -------------------------------------------------------------------

def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_prompt_expert_matches_the_hand_computed_attention_term(family):
    moa = get_moa_model(tiny_family(family), MoAConfig())
    perturb(moa, scale=0.5)  # gates non-zero, LoRA B non-zero (q_proj's LoRA moves q)
    attention = moa.model.model.layers[1].self_attn
    router = moa.model.model.layers[1].moa_router
    captured = {}
    attention.register_forward_pre_hook(
        lambda m, a, kw: captured.update(x=kw["hidden_states"], cs=kw["position_embeddings"]),
        with_kwargs=True)
    attention.o_proj.register_forward_pre_hook(  # after the prompt hook: sees its result
        lambda m, a: captured.__setitem__("o_in", a[0]))
    ids = token_batch(2, 7)
    with torch.no_grad():
        moa(ids)
        with_prompt, x, (cos, sin) = captured["o_in"], captured["x"], captured["cs"]
        g_prompt = router.last_gates[..., 6:7]
        attention.moa_prompt.active = False
        moa(ids)
        attention.moa_prompt.active = True
        without_prompt = captured["o_in"]

        heads, kv_heads, dim = 4, 2, 16
        query = attention.q_proj(x).view(2, 7, heads, dim)  # its LoRA included
        if family == "qwen3":
            query = attention.q_norm(query)
        query = query.transpose(1, 2)
        query = query * cos[:, None] + rotate_half(query) * sin[:, None]
        prompt, gate = attention.moa_prompt.prompt, attention.moa_prompt.gate
        keys = F.linear(prompt, attention.k_proj.base.weight, attention.k_proj.base.bias)
        values = F.linear(prompt, attention.v_proj.base.weight, attention.v_proj.base.bias)
        out = torch.zeros(2, 7, heads, dim)
        for h in range(heads):
            kv = h // (heads // kv_heads)
            k_h, v_h = keys.view(10, kv_heads, dim)[:, kv], values.view(10, kv_heads, dim)[:, kv]
            weights = torch.softmax(query[:, h] @ k_h.t() / dim ** 0.5, dim=-1)
            out[:, :, h] = gate[h] * (weights @ v_h)
        expected = without_prompt + g_prompt * out.reshape(2, 7, heads * dim)
    assert (with_prompt - without_prompt).abs().max() > 1e-3
    assert relative_error(with_prompt, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_query_rotary_is_bitwise_the_familys_own(family, dtype):
    # The prompt expert rotates its query alone (rotate_half_query) where the table says the
    # family's rotary is the rotate-half one: it must be that function bit for bit, or the
    # attention kernel's saved query is not recognised (and decoding would drift).
    attention = tiny_family(family).model.layers[0].self_attn
    assert FAMILIES[family].rotate_half
    rotary = rotary_function(FAMILIES[family], attention)
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 5, 16, generator=generator).to(dtype)
    angles = torch.rand(2, 5, 8, generator=generator) * 40
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1)
    sin = sin.to(dtype)
    expected, _ = rotary(query, query[:, :1], cos, sin)
    assert torch.equal(rotate_half_query(query, cos, sin), expected)
    shared = rotary_operands(cos, sin)  # what the layers of one forward share
    assert torch.equal(rotate_half_query(query, cos, sin, shared), expected)
    assert not torch.equal(expected, query * cos[:, None])  # the rotate-half term counts


def test_rotary_operands_are_made_once_per_forward(monkeypatch):
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("soft_moa"))  # two layers
    made = []
    original = prompt.rotary_operands
    monkeypatch.setattr(prompt, "rotary_operands", lambda cos, sin: made.append(cos.shape)
                        or original(cos, sin))
    with torch.no_grad():
        moa(token_batch(2, 5))
        assert len(made) == 1  # not once per layer
        moa(token_batch(2, 5))  # a new forward: new cos and sin, made anew
    assert len(made) == 2


def test_prompt_expert_on_a_fused_qkv_attention_is_a_clear_error():
    # Phi-3 projects q, k and v with one qkv_proj: no separate key and value projections
    # for the prompt keys (moa/families.py), but its layers take layer routers.
    config = Phi3Config(**SMALL, pad_token_id=0)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"prompt expert supports .* 'model\.layers\.0\.self_attn'"
                       r" is a Phi3Attention\. Set prompt_length=None"):
        get_moa_model(Phi3ForCausalLM(config), MoAConfig(target_modules=["qkv_proj"]))
    moa = get_moa_model(Phi3ForCausalLM(config),
                        MoAConfig(target_modules=["qkv_proj", "o_proj", "down_proj"],
                                  prompt_length=None))
    perturb(moa)
    assert moa(token_batch(), labels=token_batch()).loss.isfinite()


def test_cached_decoding_matches_the_full_forward():
    moa = get_moa_model(tiny_llama(), MoAConfig())
    perturb(moa, scale=0.5)
    ids = token_batch(2, 10)
    with torch.no_grad():
        full = moa(ids).logits
        # transformers 5.25 renamed the cache argument and output field to "cache" (and
        # warns that "past_key_values" goes in 5.40); the pinned 5.23 knows the old name
        key = cache_keyword(moa)
        prefix = moa(ids[:, :-3], use_cache=True)
        past, steps = getattr(prefix, key), []
        for t in range(7, 10):
            step = moa(ids[:, t:t + 1], **{key: past}, use_cache=True)
            past = getattr(step, key)
            steps.append(step.logits[:, -1])
    assert relative_error(torch.stack(steps, 1), full[:, 7:]) < 1e-5


@pytest.mark.parametrize("backend, shares", [
    ("torch", True),  # the router's GEMM computes q, k and v's shrinks too
    ("reference", False),  # another backend computes its own shrinks: nothing shared
])
def test_decoding_shares_the_routers_gemm_with_the_qkv_shrinks(backend, shares):
    moa = get_moa_model(tiny_llama(), MoAConfig(backend=backend)).eval()
    perturb(moa, scale=0.5)
    ids = token_batch(2, 6)
    layer = moa.model.model.layers[0]
    router, attention = layer.moa_router, layer.self_attn
    assert [m for _, m in router.shrink_sharers] == \
        [attention.q_proj, attention.k_proj, attention.v_proj]
    with torch.no_grad():
        plain = moa(ids).logits  # outside generate: every layer computes its own shrink
        assert router.state.shrink_input is None
        with prompt_key_cache(moa.model):
            shared = moa(ids).logits
            assert (router.state.shrink_input is not None) == shares
            if shares:
                outputs = router.state.shrink_outputs
                normed = router.state.shrink_input.reshape(-1, 64)
                for start, module in router.shrink_sharers:
                    assert relative_error(outputs[start], normed @ module.shrink_weight.t()) \
                        < 1e-5
        assert router.state.shrink_input is None  # dropped with the generate cache
    assert relative_error(shared, plain) < 1e-5


def test_torch_backend_refuses_a_shrink_output_it_cannot_use():
    layer = MoALinear(torch.nn.Linear(16, 8), "lora:4:8", router=None)
    x, gates = torch.randn(3, 16), torch.rand(3, 1)
    tensors = dict(zip(("shrink_weight", "shrink_bias", "expand_weight", "expand_bias"),
                       layer._stacked()))
    with pytest.raises(ValueError, match="shrink_output is for dense mixtures"):
        torch_ops.moa_linear(x, base_weight=layer.base.weight, base_bias=layer.base.bias,
                             layout=layer.layout, gates=gates, sparse=True,
                             shrink_output=torch.randn(3, 4), **tensors)


def test_prompt_keys_follow_the_weights_outside_generate():
    # Writes through .data (EMA, manual loading, Module.to) leave _version alone: outside
    # generate the prompt keys and values are recomputed on every forward.
    moa = get_moa_model(tiny_llama(), MoAConfig()).eval()
    perturb(moa)
    ids = token_batch()
    with torch.no_grad():
        before = moa(ids).logits
        for layer in moa.model.model.layers:
            layer.self_attn.moa_prompt.gate.data.fill_(5.0)
        after = moa(ids).logits
        fresh = copy.deepcopy(moa)(ids).logits
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh)


def test_generate_runs_with_adapters_and_matches_the_base_when_disabled():
    base = tiny_llama()
    moa = get_moa_model(tiny_llama(), MoAConfig())
    perturb(moa, scale=0.5)
    ids = token_batch(2, 5)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    generated = moa.generate(ids, **kwargs)
    assert generated.shape == (2, 9) and torch.equal(generated[:, :5], ids)
    # the per-call cache of prompt keys gives what the uncached model gives, and is gone after
    assert torch.equal(generated, moa.model.generate(ids, **kwargs))
    prompts = [m for m in moa.modules() if isinstance(m, PromptExpert)]
    assert prompts and not any(p.cache_keys_values or "_keys_values" in p.__dict__
                               and p.__dict__["_keys_values"] is not None for p in prompts)
    with moa.disable_adapters():
        assert torch.equal(moa.generate(ids, **kwargs), base.generate(ids, **kwargs))


# ---- injection errors and options --------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    # a typo: the error lists similar names
    ({"target_modules": ["q_prj"]}, r"'q_prj' \(similar: q_proj"),
    ({"target_modules": r".*\.query"}, r"match no module .* end in: .*down_proj"),
    ({"target_modules": ["mlp"]}, "match 'model.layers.0.mlp', a LlamaMLP; only nn.Linear"),
    ({"layers_to_transform": [5]}, r"layers_to_transform=\[5\] leaves no target module; "
                                   r"the model's layers are \[0, 1\]"),
    ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head' lies outside"),
    # exclude_modules removing every target: named as the cause, not layers_to_transform
    ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]},
     r"exclude_modules=\['q_proj'\] excludes every module target_modules matches"),
    # the same with a regex target
    ({"target_modules": r".*q_proj", "exclude_modules": ["q_proj"]},
     r"exclude_modules=\['q_proj'\] excludes every module target_modules matches"),
])
def test_bad_targets_fail_with_names(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_moa_model(tiny_llama(), MoAConfig(**kwargs))


def test_layer_scope_needs_pre_norm_decoder_layers_and_module_scope_does_not():
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=48))
    with pytest.raises(ValueError, match="router_scope='layer' needs pre-norm decoder layers"):
        get_moa_model(bert, MoAConfig(target_modules=["query", "value"]))
    moa = get_moa_model(bert, MoAConfig.preset("molora", target_modules=["query", "value"]))
    assert sum(isinstance(m, MoALinear) for m in moa.modules()) == 4


def parameter_flags(model):
    return [(name, param.requires_grad) for name, param in model.named_parameters()]


def llama_with_custom_last_attention():
    """A tiny Llama whose last attention module is of a class the family table lacks."""
    model = tiny_llama()
    attention = model.model.layers[-1].self_attn
    attention.__class__ = type("CustomAttention", (type(attention),), {})
    return model


@pytest.mark.parametrize("make_model, config", [
    # the prompt expert's architecture check fails after the first layers were wired
    (lambda: llama_with_custom_last_attention(), MoAConfig()),
    # top_k above the experts of a module fails when its MoALinear is built
    (tiny_llama, MoAConfig(router=RouterConfig(mode="topk", top_k=50), prompt_length=None)),
])
def test_a_failed_injection_leaves_the_model_as_it_was(make_model, config):
    model = make_model()
    model.lm_head.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)
    modules_before, flags_before = list(model.named_modules()), parameter_flags(model)
    with pytest.raises(ValueError):
        get_moa_model(model, config)
    assert [(n, type(m)) for n, m in model.named_modules()] == \
        [(n, type(m)) for n, m in modules_before]
    assert parameter_flags(model) == flags_before
    assert not any(module._forward_hooks or module._forward_pre_hooks
                   for module in model.modules())
    moa = get_moa_model(model, MoAConfig(prompt_length=None))  # a corrected retry works
    assert moa(token_batch(), labels=token_batch()).loss.isfinite()


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    moa = get_moa_model(tiny_llama(), MoAConfig())
    moa.save_pretrained(tmp_path)
    other = tiny_llama(intermediate_size=128)
    modules_before, flags_before = list(other.named_modules()), parameter_flags(other)
    with pytest.raises(ValueError, match="shape mismatches"):
        MoAModel.from_pretrained(other, tmp_path)
    assert [m for _, m in other.named_modules()] == [m for _, m in modules_before]
    assert parameter_flags(other) == flags_before


def test_unload_gives_back_the_base_model():
    base = tiny_llama()
    model = tiny_llama()
    moa = get_moa_model(model, MoAConfig())
    perturb(moa)
    assert moa.unload() is model
    ids = token_batch()
    assert not any(isinstance(m, MOA_MODULES) for m in model.modules())
    assert all(param.requires_grad for param in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("config", [
    MoAConfig.preset("lora"),  # plain LoRA r=16
    # no router, every gate 1: HydraLoRA heads sum, next to a LoRA with alpha != r
    MoAConfig(router=None, router_scope="module", parallel_adapter=None, prompt_length=None,
              experts=["hydra:4:2:8", "lora:3"]),
    # layer scope without a router: the layer routers give constant gates of 1
    MoAConfig(router=None, parallel_adapter=None, prompt_length=None, experts=["lora:8"]),
])
def test_merge_and_unload_folds_unrouted_lora_into_the_weights(config):
    moa = get_moa_model(tiny_llama(), config)
    perturb(moa, scale=0.2)
    ids = token_batch()
    with torch.no_grad():
        expected = moa(ids).logits
        merged = moa.merge_and_unload()
        assert not any(isinstance(m, MOA_MODULES) for m in merged.modules())
        assert relative_error(merged(ids).logits, expected) < 1e-5
        assert relative_error(expected, tiny_llama()(ids).logits) > 1e-3  # it did change


@pytest.mark.parametrize("config, message", [
    (MoAConfig.preset("soft_moa"), "routed mixture cannot be merged"),
    (MoAConfig.preset("molora"), "routed mixture cannot be merged"),
    (MoAConfig(router=None, router_scope="module", parallel_adapter=None, prompt_length=None,
               experts=["lora:4", "adapter:3"]), r"adapter experts \(adapter:3:silu\)"),
])
def test_what_cannot_be_merged_is_refused_and_left_alone(config, message):
    moa = get_moa_model(tiny_llama(), config)
    weight = moa.model.model.layers[0].self_attn.q_proj.base.weight.clone()
    with pytest.raises(ValueError, match=message):
        moa.merge_and_unload()
    assert isinstance(moa.model.model.layers[0].self_attn.q_proj, MoALinear)
    assert torch.equal(moa.model.model.layers[0].self_attn.q_proj.base.weight, weight)


def test_a_missing_attribute_names_both_wrappers():
    moa = get_moa_model(tiny_llama(), MoAConfig())
    assert moa.config is moa.model.config  # what the model has comes through
    with pytest.raises(AttributeError, match="neither MoAModel nor its LlamaForCausalLM has "
                                             "an attribute 'merge_adapter'"):
        moa.merge_adapter()


def test_composite_models_take_the_hidden_size_of_their_text_config():
    class Composite(torch.nn.Module):  # like a vision-language model around a Llama
        def __init__(self):
            super().__init__()
            self.language_model = tiny_llama()
            text_config = self.language_model.config
            self.config = type("CompositeConfig", (), {"get_text_config": lambda s: text_config})()

        def forward(self, **kwargs):
            return self.language_model(**kwargs)

    moa = get_moa_model(Composite(), MoAConfig())
    assert moa.language_model.model.layers[0].moa_router.router.in_features == 64
    assert moa(input_ids=token_batch(), labels=token_batch()).loss.isfinite()


def test_the_config_is_copied_at_injection(tmp_path):
    config = MoAConfig()
    moa = get_moa_model(tiny_llama(), config)
    config.dropout = 0.5
    moa.save_pretrained(tmp_path)
    assert MoAConfig.from_pretrained(tmp_path).dropout == 0.0


def test_injecting_twice_is_an_error():
    moa = get_moa_model(tiny_llama(), MoAConfig())
    with pytest.raises(ValueError, match="already has MoA modules"):
        get_moa_model(moa.model, MoAConfig())


def test_layers_to_transform_and_per_module_experts():
    config = MoAConfig(layers_to_transform=[1], parallel_adapter=8,
                       experts={"*": ["lora:4"], "down_proj": ["lora:2", "adapter:3:gelu"],
                                "q_proj": ["hydra:2:3"]})
    moa = get_moa_model(tiny_llama(), config)
    first, second = moa.model.model.layers
    assert not any(isinstance(m, MoALinear) for m in first.modules())
    assert not hasattr(first, "moa_router")
    assert second.self_attn.q_proj.num_experts == 3
    assert second.moa_router.num_experts == 3 + 1 + 1 + 1 + 2 + 1 + 1
    assert second.moa_router.expert_names[:3] == [f"self_attn.q_proj:hydra:2:3#{h}"
                                                  for h in range(3)]
    perturb(moa)
    moa(token_batch(), labels=token_batch()).loss.backward()
    assert all(p.grad is not None for _, p in moa.moa_named_parameters())
    assert all(p.grad is None for p in first.parameters())


def test_only_moa_tensors_are_trainable_and_printed_like_peft(capsys):
    moa = get_moa_model(tiny_llama(), MoAConfig())
    names = {n for n, p in moa.model.named_parameters() if p.requires_grad}
    assert names == set(moa.moa_state_dict())
    moa.print_trainable_parameters()
    total = sum(p.numel() for p in moa.parameters())
    trainable = moa.trainable_parameter_count()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: "
                                       f"{total:,d} || trainable%: "
                                       f"{100 * trainable / total:.4f}\n")
    assert re.search(r"\d,\d{3}", f"{trainable:,d}")


# ---- auxiliary loss and statistics -------------------------------------------------------

def test_load_balancing_loss_is_one_when_balanced_and_e_when_collapsed():
    uniform = torch.full((12, 4), 0.25)
    uniform[torch.arange(12), torch.arange(12) % 4] += 0.1  # argmax spread evenly
    assert load_balancing_loss(uniform).item() == pytest.approx(1.0)
    collapsed = torch.zeros(12, 4)
    collapsed[:, 0] = 0.9
    assert load_balancing_loss(collapsed).item() == pytest.approx(4.0)
    assert load_balancing_loss(torch.zeros(3, 4)).item() == 0.0  # no token routed


@pytest.mark.parametrize("preset", ["soft_moa", "molora"])
def test_aux_loss_is_added_to_the_model_loss_and_trains_the_router(preset):
    ids = token_batch(2, 8)
    plain = get_moa_model(tiny_llama(), MoAConfig.preset(preset))
    with_aux = get_moa_model(tiny_llama(), MoAConfig.preset(preset, aux_loss_coef=0.5))
    for moa in (plain, with_aux):
        perturb(moa)
    out = with_aux(ids, labels=ids)
    expected = plain(ids, labels=ids)
    # with aux, module routers run outside their MoALinear (same math; the fused backend
    # otherwise computes the router's first layer inside its shrink GEMM, so rounding differs)
    assert relative_error(out.logits, expected.logits) < 1e-6
    assert with_aux.last_aux_loss is not None and plain.last_aux_loss is None
    assert out.loss.item() == pytest.approx(expected.loss.item()
                                            + 0.5 * with_aux.last_aux_loss.item(), rel=1e-6)
    with_aux.last_aux_loss.backward()
    router_grads = [p.grad for n, p in with_aux.moa_named_parameters() if "router" in n]
    assert router_grads and all(g is not None for g in router_grads)
    assert sum(g.abs().sum() for g in router_grads) > 0


def test_gate_collector_masks_the_calls_over_the_masked_tokens():
    collector = GateCollector()
    collector.active = True
    collector.token_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    gates = torch.rand(2, 3, 4)
    collector.add(gates)  # [B, S, E] over the mask's tokens
    collector.add(gates.reshape(6, 4))  # the same tokens, flattened
    collector.add(torch.rand(2, 5, 4))  # other tokens (a decoder's): every one counts
    kept = gates[torch.tensor([[True, True, False], [True, False, False]])]
    assert torch.equal(collector.gates[0], kept) and torch.equal(collector.gates[1], kept)
    assert collector.gates[2].shape == (10, 4)


def test_gate_collector_zeroes_the_masked_tokens_on_accelerators():
    # on an accelerator a boolean selection syncs: the masked tokens' gates are zeroed
    # instead, which the load-balancing loss counts exactly as no token
    collector = GateCollector()
    collector.active = True
    collector.token_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    gates = torch.rand(2, 3, 4)
    with torch_ops.accelerator_decisions():
        collector.add(gates)
    keep = collector.token_mask.bool()
    assert collector.gates[0].shape == (6, 4)
    assert torch.equal(collector.gates[0][keep.reshape(-1)], gates[keep])
    assert torch.all(collector.gates[0][~keep.reshape(-1)] == 0)
    assert load_balancing_loss(collector.gates[0]).item() == \
        pytest.approx(load_balancing_loss(gates[keep]).item(), rel=1e-6)


def test_aux_loss_leaves_padding_out():
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("soft_moa", aux_loss_coef=0.1))
    perturb(moa, scale=0.5)
    ids = token_batch(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding on the second row
    moa(ids, attention_mask=mask, labels=ids)
    routers = [layer.moa_router for layer in moa.model.model.layers]
    expected = torch.stack([load_balancing_loss(r.last_gates[mask.bool()]) for r in routers])
    unmasked = torch.stack([load_balancing_loss(r.last_gates.reshape(-1, r.last_gates.shape[-1]))
                            for r in routers])
    assert moa.last_aux_loss.item() == pytest.approx(expected.mean().item(), rel=1e-6)
    assert abs(expected.mean().item() - unmasked.mean().item()) > 1e-4  # the mask matters


def test_instance_aux_loss_leaves_sequences_of_padding_only_out():
    # (a sequence of padding only counted: 1.0493 for a batch with no real token at all)
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("instance_moa", aux_loss_coef=0.1))
    perturb(moa, scale=0.5)
    ids = token_batch(3, 8)
    mask = torch.ones_like(ids)
    mask[1] = 0  # the second sequence is padding only
    mask[2, 6:] = 0
    moa(ids, attention_mask=mask, labels=ids)
    with_padding_row = moa.last_aux_loss.item()
    moa(ids[[0, 2]], attention_mask=mask[[0, 2]], labels=ids[[0, 2]])
    without = moa.last_aux_loss.item()
    assert with_padding_row == pytest.approx(without, rel=1e-6) and without > 0.5
    moa(ids, labels=ids)  # without the mask the second sequence counts, and changes the loss
    assert abs(moa.last_aux_loss.item() - without) > 1e-4


def test_router_stats_per_layer_and_expert():
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("sparse_moa"))
    perturb(moa, scale=0.5)
    with torch.no_grad():
        moa(token_batch(3, 8))
    stats = moa.router_stats()
    assert sorted(stats) == ["model.layers.0.moa_router", "model.layers.1.moa_router"]
    for name, entry in stats.items():
        gates = moa.model.get_submodule(name).last_gates.reshape(-1, 6).double()
        assert entry["tokens"] == 24 and len(entry["experts"]) == 6
        assert entry["experts"][5] == "parallel_adapter:adapter:16:silu"
        assert entry["mean_gate"] == pytest.approx(gates.mean(0).tolist())
        assert entry["active_fraction"] == pytest.approx((gates > 0).double().mean(0).tolist())
    with moa.disable_adapters(), torch.no_grad():
        moa(token_batch(1, 3))
        assert moa.router_stats() == {}  # no router ran in that forward
    module_stats = get_moa_model(tiny_llama(), MoAConfig.preset("molora"))
    module_stats(token_batch())
    assert "model.layers.1.mlp.down_proj" in module_stats.router_stats()
    lora = get_moa_model(tiny_llama(), MoAConfig.preset("lora"))
    lora(token_batch())
    assert lora.router_stats() == {}


# ---- saving and loading ------------------------------------------------------------------

def test_loading_names_missing_extra_and_mismatched_keys(tmp_path):
    moa = get_moa_model(tiny_llama(), MoAConfig())
    perturb(moa)
    moa.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors",
                                                          "moa_config.json"]
    weights = load_file(tmp_path / WEIGHTS_NAME)
    assert set(weights) == set(moa.moa_state_dict())
    assert not any(".base." in k for k in weights)

    with pytest.raises(ValueError, match=r"shape mismatches: model\.layers\.0\.mlp\.down_proj"
                                         r"\.shrink_weight \(saved \(8, 96\), model \(8, 128\)\)"):
        MoAModel.from_pretrained(tiny_llama(intermediate_size=128), tmp_path)

    key = "model.layers.1.moa_router.router.w2_bias"
    save_file({k: v for k, v in weights.items() if k != key}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"missing keys: {re.escape(key)}"):
        MoAModel.from_pretrained(tiny_llama(), tmp_path)

    save_file({**weights, "model.layers.1.extra": torch.ones(2)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"unexpected keys: model\.layers\.1\.extra"):
        MoAModel.from_pretrained(tiny_llama(), tmp_path)

    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        MoAModel.from_pretrained(tiny_llama(), tmp_path)


def test_saving_and_counting_inside_disable_adapters_see_every_moa_tensor(tmp_path):
    moa = get_moa_model(tiny_llama(), MoAConfig())
    perturb(moa)
    names, count = sorted(moa.moa_state_dict()), moa.trainable_parameter_count()
    with moa.disable_adapters():
        assert sorted(moa.moa_state_dict()) == names
        assert moa.trainable_parameter_count() == count
        moa.save_pretrained(tmp_path)
    reloaded = MoAModel.from_pretrained(tiny_llama(), tmp_path)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, moa(ids).logits)


def test_loading_refuses_non_float_tensors_and_can_change_the_backend(tmp_path):
    moa = get_moa_model(tiny_llama(), MoAConfig(backend="torch"))
    moa.save_pretrained(tmp_path)
    weights = load_file(tmp_path / WEIGHTS_NAME)
    key = "model.layers.0.self_attn.q_proj.expand_weight"
    save_file({**weights, key: weights[key].long()}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"floating-point tensors; got {re.escape(key)} "
                                         r"\(torch.int64\)"):
        MoAModel.from_pretrained(tiny_llama(), tmp_path)
    save_file(weights, tmp_path / WEIGHTS_NAME)
    reloaded = MoAModel.from_pretrained(tiny_llama(), tmp_path, backend="reference")
    assert reloaded.moa_config.backend == "reference"
    assert {m.backend for m in reloaded.modules() if isinstance(m, MoALinear)} == {"reference"}


def test_the_adapter_records_its_base_model_and_warns_on_another(tmp_path):
    model = tiny_llama()
    model.config._name_or_path = "org/base-model"
    moa = get_moa_model(model, MoAConfig())
    moa.save_pretrained(tmp_path)
    from safetensors import safe_open

    from moa import __version__

    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as handle:
        assert handle.metadata()["base_model_name_or_path"] == "org/base-model"
        assert handle.metadata()["moa_version"] == __version__
    other = tiny_llama()
    other.config._name_or_path = "org/other-model"
    with pytest.warns(UserWarning, match="trained on 'org/base-model'; loading it into "
                                         "'org/other-model'"):
        MoAModel.from_pretrained(other, tmp_path)
    local_copy = tiny_llama()
    local_copy.config._name_or_path = "/models/base-model/"  # the same checkpoint, on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoAModel.from_pretrained(local_copy, tmp_path)


def test_inference_only_loading_freezes_everything(tmp_path):
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("sparse_moa"))
    perturb(moa)
    moa.save_pretrained(tmp_path)
    frozen = MoAModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=False)
    assert frozen.trainable_parameter_count() == 0
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(frozen(ids).logits, moa(ids).logits)


def test_loading_for_inference_turns_dropout_off_and_for_training_leaves_the_modes(tmp_path):
    """from_pretrained's default (is_trainable=False, as PEFT's) loads for inference: the
    whole model in eval mode, so with dropout > 0 two identical calls give identical logits
    and greedy generation is deterministic. is_trainable=True leaves the modes as loading
    leaves them (the MoA modules in training mode, as PEFT leaves its new layers); a later
    load_adapter(is_trainable=False) puts the model in eval mode, as PEFT's does."""
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("soft_moa", dropout=0.5))
    perturb(moa, scale=0.5)
    moa.save_pretrained(tmp_path)
    ids = token_batch()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                  pad_token_id=0)

    loaded = MoAModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(module.training for module in loaded.modules())
    assert loaded.trainable_parameter_count() == 0
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.equal(loaded(ids).logits, logits)
        assert torch.equal(moa.eval()(ids).logits, logits)  # the saved model, dropout off
    assert torch.equal(loaded.generate(ids, **kwargs), loaded.generate(ids, **kwargs))

    trainable = MoAModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.trainable_parameter_count() == moa.trainable_parameter_count() > 0
    assert all(module.training for module in trainable.modules()
               if isinstance(module, MoALinear))
    with torch.no_grad():  # dropout is on there: the same call twice differs
        assert not torch.equal(trainable(ids).logits, trainable(ids).logits)
    trainable.load_adapter(tmp_path, is_trainable=False)  # PEFT's load_adapter: eval too
    assert not any(module.training for module in trainable.modules())
    with torch.no_grad():
        assert torch.equal(trainable(ids).logits, logits)


@pytest.mark.parametrize("preset", ["instance_moa", "unipeft"])
def test_instance_routing_takes_each_calls_mask_by_keyword_or_position_at_any_entry(preset):
    # (a positional mask was not seen, and a call of the decoder stack read the mask of the
    # model's previous call)
    moa = get_moa_model(tiny_llama(), MoAConfig.preset(preset, backend="torch"))
    perturb(moa, scale=0.2)
    moa.eval()
    ids = token_batch(2, 9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # row 1: 5 real tokens, then padding
    other = torch.ones_like(ids)
    other[0, 3:] = 0
    base = moa.get_base_model()
    with torch.no_grad():
        alone = moa(input_ids=ids[1:, :5]).logits[0]
        assert (moa(input_ids=ids, attention_mask=other).logits[1, :5] - alone).abs().max() \
            > 1e-3  # the mask matters for row 1
        positional = base(ids, mask).logits[1, :5]
        stack_alone = base.model(input_ids=ids[1:, :5]).last_hidden_state[0]
        moa(input_ids=ids, attention_mask=other)  # a call with another mask first
        stack = base.model(input_ids=ids, attention_mask=mask).last_hidden_state[1, :5]
        moa(input_ids=ids, attention_mask=other)
        unpadded = base.model(input_ids=ids).last_hidden_state
    assert relative_error(positional, alone) < 1e-5
    assert relative_error(stack, stack_alone) < 1e-5
    with torch.no_grad():  # no mask given: every token counts, whatever came before
        moa(input_ids=ids)
        assert torch.equal(base.model(input_ids=ids).last_hidden_state, unpadded)


@pytest.mark.parametrize("first_load", ["from_pretrained", "load_adapter"])
def test_load_adapter_for_training_after_a_load_for_inference_trains_again(tmp_path,
                                                                           first_load):
    # (it stayed frozen: 0 trainable, the Trainer's resume then trained nothing)
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("sparse_moa"))
    perturb(moa)
    moa.save_pretrained(tmp_path)
    trains = {name: param.requires_grad for name, param in moa.moa_named_parameters()}
    assert not all(trains.values()) and any(trains.values())  # thresholds stay frozen
    if first_load == "from_pretrained":
        loaded = MoAModel.from_pretrained(tiny_llama(), tmp_path)
    else:
        loaded = get_moa_model(tiny_llama(), MoAConfig.preset("sparse_moa"))
        loaded.load_adapter(tmp_path, is_trainable=False)
    assert loaded.trainable_parameter_count() == 0
    loaded.load_adapter(tmp_path, is_trainable=True)
    assert {name: param.requires_grad for name, param in loaded.moa_named_parameters()} \
        == trains
    assert loaded.trainable_parameter_count() == moa.trainable_parameter_count()
    assert all(module.training for module in loaded.modules() if isinstance(module, MoALinear))
    loaded(token_batch(), labels=token_batch()).loss.backward()
    assert all((param.grad is not None) == trains[name]
               for name, param in loaded.moa_named_parameters())


# ---- compatibility -----------------------------------------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int) -> None:
        self.ids = token_batch(count, length, seed=5)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "attention_mask": torch.ones_like(self.ids[index]),
                "labels": self.ids[index]}


def test_transformers_trainer_trains_only_the_adapters(tmp_path):
    moa = get_moa_model(tiny_llama(), MoAConfig())
    base_before = {n: p.detach().clone() for n, p in moa.model.named_parameters()
                   if not p.requires_grad}
    moa_before = {n: p.clone() for n, p in moa.moa_state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, learning_rate=1e-2,
                             per_device_train_batch_size=4, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=moa, args=args, train_dataset=TokenDataset(8, 12))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and losses[-1] < losses[0]
    for name, value in moa.model.named_parameters():
        if name in base_before:
            assert torch.equal(value, base_before[name]), name
    changed = [n for n, p in moa.moa_state_dict().items() if not torch.equal(p, moa_before[n])]
    assert len(changed) == len(moa_before)


def published_layer_loss(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The published MoE-LoRA layer loss (DCDmllm/MoA, MoA_Transformers/src/mole and adamole):
    E * sum_e (tokens selecting e / T) * (sum of the scores of e / T)."""
    tokens, experts = probs.shape
    return experts * torch.sum(selected.float().sum(0) / tokens * probs.sum(0) / tokens)


@pytest.mark.parametrize("mode", ["topk", "adaptive"])
def test_load_balancing_loss_of_a_selecting_router_is_the_published_one(mode):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 8, generator=generator) * 2
    threshold_logit = torch.randn(40, 1, generator=generator)
    first = torch.cat([logits, threshold_logit], 1) if mode == "adaptive" else logits
    gates, active, scores = gates_from_first_layer(
        first, kind="linear", gate="softmax", mode=mode, num_experts=8, top_k=2,
        max_threshold=1 / 8, balance=True)
    probs = torch.softmax(logits, -1)
    if mode == "topk":  # bincount of the top-2 choices, as the published top-k layer counts
        chosen = probs.topk(2, dim=-1).indices
        selected = torch.zeros(40, 8).scatter_(1, chosen, 1.0)
        expected_scores = probs
    else:  # the adaptive layer: p minus the threshold, selected where that is >= 0
        expected_scores = probs - torch.sigmoid(threshold_logit) / 8
        selected = (expected_scores >= 0).float()
    assert torch.equal(active, selected.bool())
    assert torch.allclose(scores, expected_scores, rtol=0, atol=1e-7)
    expected = published_layer_loss(expected_scores, selected)
    assert expected.abs() > 0.1  # not a degenerate scale
    assert load_balancing_loss(scores, active).item() == pytest.approx(expected.item(),
                                                                       rel=1e-6)


def test_the_selecting_baseline_presets_add_the_published_balancing_loss_summed():
    for preset in ("topk_moelora", "adamole"):
        config = MoAConfig.preset(preset)
        assert (config.aux_loss_coef, config.aux_loss_reduction) == (1e-3, "sum")
    with pytest.raises(ValueError, match="aux_loss_reduction 'max'; allowed: mean, sum"):
        MoAConfig(aux_loss_reduction="max")
    ids = token_batch(2, 8)
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("topk_moelora"))
    perturb(moa, scale=0.5)
    inputs = {}
    handles = [module.register_forward_pre_hook(
        lambda module, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, module in moa.named_modules() if isinstance(module, MoALinear)]
    out = moa(ids, labels=ids)
    for handle in handles:
        handle.remove()
    expected = torch.zeros(())
    for name, module in moa.named_modules():
        if isinstance(module, MoALinear):
            x = inputs[name].reshape(-1, module.in_features)
            probs = torch.softmax(x @ module.router.weight.detach().t(), -1)
            selected = torch.zeros_like(probs).scatter_(1, probs.topk(2, -1).indices, 1.0)
            expected = expected + published_layer_loss(probs, selected)
    assert len(inputs) == 10 and expected > 1
    assert moa.last_aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    lm_loss = moa.model(ids, labels=ids).loss  # the same model, the loss without the aux term
    assert out.loss.item() == pytest.approx(lm_loss.item() + 1e-3 * expected.item(), rel=1e-6)
    moa.last_aux_loss.backward()
    weight_grads = [m.router.weight.grad for m in moa.modules() if isinstance(m, MoALinear)]
    assert all(g is not None and g.abs().sum() > 0 for g in weight_grads)


def published_scores(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, selected) [T, E] of a MoARouter for tokens x [T, in], as the published
    MoE-LoRA layers take them: the probabilities p (topk, threshold) or p minus the
    threshold (adaptive), and the pairs selected."""
    config = router.config
    params = {name: None if value is None else value.detach()
              for name, value in router.tensors().items()}
    p = reference.reference_router(x, params, kind=config.kind, gate=config.gate, mode="soft")
    if config.mode == "topk":
        return p, torch.zeros_like(p).scatter_(1, p.topk(config.top_k, -1).indices, 1.0)
    threshold = config.max_threshold * torch.sigmoid(
        F.linear(x, params["threshold_weight"], params["threshold_bias"]))
    if config.mode == "threshold":
        return p, p >= threshold
    return p - threshold, p >= threshold


@pytest.mark.parametrize("scope, mode", [
    ("layer", "topk"),  # a router per decoder layer, over its (unpadded) tokens
    ("layer", "adaptive"),
    ("instance", "topk"),  # a router per decoder layer, over each sequence's mean
    ("instance", "adaptive"),
])
def test_a_selecting_layer_router_adds_the_published_balancing_loss(scope, mode):
    config = MoAConfig.preset("soft_moa", router=RouterConfig(mode=mode, max_threshold=0.25),
                              router_scope=scope, prompt_length=None, aux_loss_coef=0.1)
    moa = get_moa_model(tiny_llama(), config)
    perturb(moa, scale=0.5)
    ids = token_batch(4, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding: no token of the loss (its mean leaves it out too)
    inputs = []
    handles = [layer.moa_router.router.register_forward_pre_hook(
        lambda module, args: inputs.append((module, args[0].detach())))
        for layer in moa.model.model.layers]
    moa(ids, attention_mask=mask, labels=ids)
    for handle in handles:
        handle.remove()
    assert len(inputs) == 2
    losses = []
    for router, x in inputs:
        x = x[mask.bool()] if scope == "layer" else x.reshape(-1, x.shape[-1])
        assert x.shape[0] == (29 if scope == "layer" else 4)
        losses.append(published_layer_loss(*published_scores(router, x)))
    expected = torch.stack(losses).mean()
    assert expected > 0.5  # not a degenerate scale
    assert moa.last_aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("preset, backend", [
    ("soft_moa", "auto"), ("sparse_moa", "auto"),  # layer routers
    # module routers, routed by the aux-loss hook (dense, sparse)
    ("molora", "auto"), ("topk_moelora", "auto"),
    # the oracle backend routes a selecting router twice (gates, and the loss's scores),
    # in the forward and in its recompute alike
    ("topk_moelora", "reference"), ("adamole", "reference"),
])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(preset, backend):
    ids = token_batch(2, 10)
    results = []
    for checkpointing in (False, True):
        moa = get_moa_model(tiny_llama(), MoAConfig.preset(preset, aux_loss_coef=0.1,
                                                           backend=backend))
        perturb(moa)
        moa.train()
        if checkpointing:
            moa.activation_checkpointing_enable()  # the model's, through MoAModel
            assert all(layer.gradient_checkpointing for layer in moa.model.model.layers)
        loss = moa(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), moa_tensors_and_grads(moa)))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    assert torch.equal(loss, checkpointed_loss)
    assert grads.keys() == checkpointed_grads.keys() and len(grads) > 0
    for name, (_, grad) in grads.items():
        assert relative_error(checkpointed_grads[name][1], grad) < 1e-6, name


@pytest.mark.parametrize("preset", ["instance_moa", "unipeft"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_instance_routing_recomputes_each_forward_with_its_own_mask(preset,
                                                                                reentrant):
    # Two padded forwards before one backward (summed losses): each recompute must read
    # its own forward's mask, not the last one's (0.80 / 0.45 relative error before).
    first, second = token_batch(2, 9, seed=1), token_batch(2, 9, seed=3)
    first_mask, second_mask = torch.ones_like(first), torch.ones_like(second)
    first_mask[1, 4:] = 0
    second_mask[0, 6:] = 0
    grads = []
    for checkpointing in (False, True):
        moa = get_moa_model(tiny_llama(), MoAConfig.preset(preset, backend="torch"))
        perturb(moa)
        moa.train()
        if checkpointing:
            moa.activation_checkpointing_enable({"use_reentrant": reentrant})
        loss = sum(moa(input_ids=ids, attention_mask=mask,
                       labels=ids.masked_fill(mask == 0, -100)).loss
                   for ids, mask in ((first, first_mask), (second, second_mask)))
        loss.backward()
        grads.append(moa_tensors_and_grads(moa))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, (_, grad) in grads[0].items():
        assert grad.norm() > 1e-6, name
        assert relative_error(grads[1][name][1], grad) < 1e-5, name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_training_through_the_shared_router_gemm_matches_separate_gemms(checkpointing):
    # In grad mode one GEMM computes a layer router's first layer and the q, k and v
    # shrinks (stacked once per call). Against the same model with that sharing off (every
    # projection its own shrink GEMM): the losses and every gradient over two AdamW steps,
    # the second accumulated over two micro-batches, with and without checkpointing.
    results = {}
    for shared in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            if not shared:
                patch.setattr(layer_router.LayerRouter, "_sharing_plan", lambda *args: False)
            moa = get_moa_model(tiny_llama(), MoAConfig.preset("soft_moa"))
            perturb(moa)
            moa.train()
            if checkpointing:
                moa.activation_checkpointing_enable()
            optimizer = torch.optim.AdamW([p for _, p in moa.moa_named_parameters()], lr=1e-2)
            losses, grads = [], []
            for micro_batches in ((1,), (2, 3)):
                for seed in micro_batches:
                    ids = token_batch(2, 8, seed=seed)
                    loss = moa(ids, labels=ids).loss / len(micro_batches)
                    loss.backward()
                    losses.append(loss.detach())
                    assert (moa.model.model.layers[0].moa_router.state.shrink_input
                            is not None) == shared
                grads.append({n: g.clone() for n, (_, g) in moa_tensors_and_grads(moa).items()})
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            results[shared] = (losses, grads)
    (losses, grads), (separate_losses, separate_grads) = results[True], results[False]
    for loss, separate in zip(losses, separate_losses):
        assert relative_error(loss, separate) < 1e-6
    for step, separate in zip(grads, separate_grads):
        assert step.keys() == separate.keys() and len(step) > 0
        for name, grad in step.items():
            assert relative_error(grad, separate[name]) < 1e-5, name


def test_a_partitioned_sharer_weight_is_not_shared():
    # The router reads its sharers' shrink weights without calling their modules: a
    # weight not yet gathered (DeepSpeed ZeRO-3 keeps a partitioned parameter as an empty
    # tensor until its module runs) must make the router compute its own GEMM alone.
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("soft_moa"))
    router = moa.model.model.layers[0].moa_router
    assert router._sharing_plan(torch.device("cpu"), torch.float32) is not False
    k_proj = moa.model.model.layers[0].self_attn.k_proj
    full = k_proj.shrink_weight.data
    k_proj.shrink_weight.data = torch.empty(0)
    try:
        assert router._sharing_plan(torch.device("cpu"), torch.float32) is False
    finally:
        k_proj.shrink_weight.data = full
    gate = router.router.w1_weight
    full = gate.data
    gate.data = torch.empty(0)
    try:
        assert router._sharing_plan(torch.device("cpu"), torch.float32) is False
    finally:
        gate.data = full


def autograd_nodes(tensor: torch.Tensor) -> list:
    """Every node of tensor's autograd graph."""
    seen, stack, nodes = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack += [following for following, _ in node.next_functions]
    return nodes


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def check_saved_tensors(nodes: list, layers: int, attention: str) -> None:
    def named(name):
        return [node for node in nodes if type(node).__name__ == name]

    attention_queries = {storage(node._saved_query) for node in nodes
                         if hasattr(node, "_saved_query")}
    prompts = named("_PromptAttentionBackward")
    assert len(prompts) == layers
    # A fused attention kernel saves a query (Gemma2 runs eager attention: nothing to share)
    assert bool(attention_queries) == (attention == "sdpa")
    if attention_queries:
        assert all(storage(node.saved_tensors[0]) in attention_queries for node in prompts)
    adapters = named("_GatedAdapterBackward")
    assert len(adapters) == layers and all(node.saved_tensors[0] is None for node in adapters)
    recomputed = [node for node in named("BaseAndShrinkBackward")
                  if node.saved_tensors[0] is None]
    assert len(recomputed) == layers  # o_proj's, one per layer


def test_the_attention_query_is_shared_only_where_it_is_the_rotary_of_the_captured_one():
    # by metadata, not values (a comparison would sync an accelerator at every layer): the
    # attention's saved query is the prompt expert's query where it is the output of the
    # rotary's add, computed from the captured query, of the expected shape
    torch.manual_seed(0)
    weight = torch.randn(8, 8, requires_grad=True)
    captured = torch.randn(2, 5, 8) @ weight  # what the q_proj hook captures
    pre_rotary = captured.view(2, 5, 2, 4).transpose(1, 2)
    cos, sin = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    keys, values = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)

    def attention_output(query):
        out = F.scaled_dot_product_attention(query, keys, values)
        return out.transpose(1, 2).reshape(2, 5, 8)

    rotated = prompt.rotate_half_query(pre_rotary, cos, sin)
    shared = prompt.attention_saved_query(attention_output(rotated), captured, rotated.shape)
    assert shared is not None and torch.equal(shared, rotated)
    assert shared.untyped_storage().data_ptr() == rotated.untyped_storage().data_ptr()
    # changed between the rotary and the kernel (scaled, copied): not the expert's query
    for changed in (rotated * 1.5, rotated.contiguous(), rotated.float().double()):
        assert prompt.attention_saved_query(attention_output(changed.float()), captured,
                                             rotated.shape) is None
    # the rotary of another query, or another shape: not taken either
    other = torch.randn(2, 5, 8) @ weight
    assert prompt.attention_saved_query(attention_output(rotated), other, rotated.shape) \
        is None
    assert prompt.attention_saved_query(attention_output(rotated), captured,
                                         torch.Size((2, 5, 2, 4))) is None
    with torch.no_grad():  # nothing saved without grad mode
        assert prompt.attention_saved_query(attention_output(rotated), captured,
                                             rotated.shape) is None


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_soft_moa_saves_no_copy_of_what_the_attention_and_the_norms_keep(family, monkeypatch):
    # docs/DESIGN.md "Saved tensors": the prompt expert saves the attention kernel's own
    # query, o_proj recomputes its input (attention output + prompt output), the parallel
    # adapter recomputes its input from the norm's input. Gradients must be those of the
    # same model saving its inputs (the recomputations switched off), on fresh weights.
    ids = token_batch(2, 10)
    runs = {}
    for lean in (True, False):
        with monkeypatch.context() as patch:
            if not lean:
                patch.setattr(prompt, "attention_saved_query", lambda *arguments: None)
                patch.setattr(prompt, "prompt_attention_recipe", lambda *operands: None)
                patch.setattr(parallel_adapter.NormRecordHook, "__call__", lambda self, *args: None)
            moa = get_moa_model(tiny_family(family), MoAConfig.preset("soft_moa"))
            perturb(moa)
            moa.train()
            loss = moa(ids, labels=ids).loss
            if lean:
                check_saved_tensors(autograd_nodes(loss), len(moa.model.model.layers),
                                    moa.model.config._attn_implementation)
            loss.backward()
        runs[lean] = {"y": loss.detach(), **{name: grad for name, (_, grad) in
                                            moa_tensors_and_grads(moa).items()}}
    assert_results_match(runs[True], runs[False], 1e-5, dtype=torch.float32)


# bf16 rounding: the adapters' effect on the loss is matched to 0.3 % and every gradient to
# 2.6 % of its own norm at most (measured on the tiny Llama); these leave a 2x-6x margin.
BF16_EFFECT_TOL = 2e-2
BF16_GRADIENT_TOL = 5e-2


def test_bf16_base_and_autocast_keep_adapters_in_fp32():
    """A bf16 base and fp32 autocast to bf16 against the fp32 model, compared where the
    adapters show: all of them together move the loss by under 1 %, so the loss is compared
    as the adapters' effect on it, loss - loss with the adapters disabled; and each MoA
    tensor's gradient against its own norm (in one concatenated vector the parallel adapter
    carries 98 % of the norm, and the prompt expert's gradients could be anything)."""
    ids = token_batch(2, 10)

    def run(model, precision):
        moa = get_moa_model(model, MoAConfig())
        perturb(moa)
        with precision:
            with torch.no_grad(), moa.disable_adapters():
                base_loss = moa(ids, labels=ids).loss
            loss = moa(ids, labels=ids).loss
        loss.backward()
        return moa, loss.detach().float() - base_loss.float(), moa_tensors_and_grads(moa)

    _, expected_effect, expected = run(tiny_llama(), contextlib.nullcontext())
    assert abs(expected_effect) > 1e-2  # the adapters do move the loss
    runs = {"bf16 base": run(tiny_llama().to(torch.bfloat16), contextlib.nullcontext()),
            "autocast": run(tiny_llama(), torch.autocast("cpu", dtype=torch.bfloat16))}
    for precision, (moa, effect, grads) in runs.items():
        assert {p.dtype for _, p in moa.moa_named_parameters()} == {torch.float32}, precision
        assert relative_error(effect, expected_effect) < BF16_EFFECT_TOL, precision
        assert grads.keys() == expected.keys(), precision
        for name, (_, grad) in grads.items():
            assert grad.dtype == torch.float32, (precision, name)
            error = relative_error(grad, expected[name][1])
            assert error < BF16_GRADIENT_TOL, (precision, name, error)
    assert llama_config().hidden_size == 64


def test_a_deep_copy_routes_through_its_own_modules():
    moa = get_moa_model(tiny_llama(), MoAConfig())
    perturb(moa)
    ids = token_batch()
    clone = copy.deepcopy(moa)
    with torch.no_grad():
        original = moa(ids).logits
        assert torch.equal(clone(ids).logits, original)
        clone.model.model.layers[0].self_attn.moa_prompt.gate.add_(1.0)
        clone.model.model.layers[1].moa_router.router.w2_bias.add_(1.0)
        assert not torch.equal(clone(ids).logits, original)
        assert torch.equal(moa(ids).logits, original)
        with clone.disable_adapters():
            assert torch.equal(clone(ids).logits, tiny_llama()(ids).logits)
