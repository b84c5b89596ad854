"""Instance routing (one gate vector per sequence, from the masked sequence mean), the
UniPELT-style group gates of the `unipeft` preset, and routers that read the residual
stream instead of the input norm's output (MoAConfig.router_input)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from moa import MoAConfig, get_moa_model
from moa.modules.layer_router import masked_mean
from moa.modules.router import GroupGates
from tests.conftest import relative_error
from tests.moa.tiny import perturb, tiny_llama, token_batch

LLAMA_3_1_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128)
QWEN3_8B = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128)

# Per layer, LoRA r=8 on q, k, v, o, down: Llama 360,448 (down 14336 -> 4096), Qwen3 344,064
# (down 12288 -> 4096); parallel adapter 16: 135,184; prompt 10 x 4096 + 32 head gates:
# 40,992; soft_moa's SwiGLU x4 router over 7 experts: 229,635; unipeft's gates: 3 x 4097.
COUNTS = {
    ("instance_moa", "llama"): 24_520_288,  # as soft_moa: 32 x 766,259
    ("unipeft", "llama"): 17_565_280,  # 32 x (360,448 + 135,184 + 40,992 + 12,291)
    ("instance_moa", "qwen3"): 36 * (344_064 + 229_635 + 135_184 + 40_992),
    ("unipeft", "qwen3"): 36 * (344_064 + 135_184 + 40_992 + 12_291),
}


@pytest.mark.parametrize("preset, family", sorted(COUNTS))
def test_trainable_parameters_on_the_8b_shapes(preset, family):
    with torch.device("meta"):
        model = LlamaForCausalLM(LLAMA_3_1_8B) if family == "llama" else \
            Qwen3ForCausalLM(QWEN3_8B)
    moa = get_moa_model(model, MoAConfig.preset(preset))
    assert sum(p.numel() for _, p in moa.moa_named_parameters()) == COUNTS[preset, family]


def router_input_of(moa, layer: int = 1) -> dict:
    """Captures what decoder layer `layer`'s input norm reads and returns."""
    norm = moa.model.model.layers[layer].input_layernorm
    seen = {}
    norm.register_forward_hook(lambda m, args, out: seen.update(residual=args[0], normed=out))
    return seen


def gates_by_hand(router, x: torch.Tensor) -> torch.Tensor:
    params = router.router.tensors()
    up = x @ params["w1_weight"].t() + params["w1_bias"]
    gate = x @ params["w3_weight"].t() + params["w3_bias"]
    logits = (torch.nn.functional.silu(up) * gate) @ params["w2_weight"].t() + params["w2_bias"]
    return torch.sigmoid(logits)


def test_instance_gates_are_the_router_of_the_masked_sequence_mean():
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("instance_moa"))
    perturb(moa, scale=0.5)
    seen = router_input_of(moa)
    ids = token_batch(3, 9)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding of the second sequence
    with torch.no_grad():
        moa(input_ids=ids, attention_mask=mask)
    router = moa.model.model.layers[1].moa_router
    gates = router.last_gates
    assert gates.shape == (3, 1, router.num_experts)  # one gate vector per sequence
    normed = seen["normed"]
    expected = torch.stack([gates_by_hand(router, normed[b][mask[b].bool()].mean(0))
                            for b in range(3)])[:, None]
    assert relative_error(gates, expected) < 1e-5
    unmasked = gates_by_hand(router, normed[1].mean(0))  # padding averaged in, as published
    assert relative_error(unmasked, expected[1, 0]) > 1e-4  # ... which we do not do


def test_left_padding_changes_neither_the_gates_nor_the_real_tokens_logits():
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("instance_moa"))
    perturb(moa, scale=0.5)
    ids = token_batch(1, 7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)],
                     dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # the prompt expert reads positions
    router = moa.model.model.layers[0].moa_router
    with torch.no_grad():
        plain = moa(input_ids=ids).logits
        plain_gates = router.last_gates
        left = moa(input_ids=padded, attention_mask=mask, position_ids=positions).logits
        left_gates = router.last_gates
    assert relative_error(left_gates, plain_gates) < 1e-5
    assert relative_error(left[:, 3:], plain) < 1e-5


def test_generate_reuses_the_prompt_gates_at_every_decoding_step():
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("instance_moa"))
    perturb(moa, scale=0.5)
    moa.eval()
    router = moa.model.model.layers[0].moa_router
    steps = []
    moa.model.model.layers[0].input_layernorm.register_forward_hook(
        lambda m, a, out: steps.append((a[0].shape[1], router.gates.clone())))
    prompt = token_batch(2, 6)
    with torch.no_grad():
        generated = moa.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=4, do_sample=False, pad_token_id=0)
        during = list(steps)  # what generate's forwards saw
        moa(input_ids=prompt)
        prompt_gates = router.last_gates
    assert generated.shape == (2, 10)
    assert [length for length, _ in during] == [6, 1, 1, 1]  # prefill, then cached steps
    for _, gates in during:
        assert torch.equal(gates, during[0][1])
    assert relative_error(during[0][1], prompt_gates) < 1e-6
    assert router.prompt_gates is None  # nothing kept after the call


def test_unipeft_has_three_group_gates_per_layer_that_all_learn():
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("unipeft"))
    layer = moa.model.model.layers[0]
    gates = layer.moa_router.router
    assert isinstance(gates, GroupGates) and gates.weight.shape == (3, 64)
    # the 5 LoRA experts share group 0, then the parallel adapter, then the prompt
    assert gates.group_index.tolist() == [0, 0, 0, 0, 0, 1, 2]
    ids = token_batch(4, 12)
    optimizer = torch.optim.AdamW([p for p in moa.parameters() if p.requires_grad], lr=1e-2)
    moa.train()
    for _ in range(2):  # the prompt's head gates start at 0: its group learns from step 2
        optimizer.zero_grad()
        moa(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    for group in range(3):
        assert gates.weight.grad[group].norm() > 0, group
        assert gates.bias.grad[group] != 0, group
    applied = layer.moa_router.last_gates
    assert applied.shape == (4, 1, 7)
    assert torch.equal(applied[..., 0], applied[..., 4])  # one gate for all LoRA modules


@pytest.mark.parametrize("preset", ["soft_moa", "instance_moa"])
def test_router_input_residual_reads_the_layer_input(preset):
    moa = get_moa_model(tiny_llama(), MoAConfig.preset(preset, router_input="residual"))
    perturb(moa, scale=0.5)
    seen = router_input_of(moa)
    ids = token_batch(2, 8)
    with torch.no_grad():
        moa(input_ids=ids)
    router = moa.model.model.layers[1].moa_router
    x = seen["residual"]
    if preset == "instance_moa":
        x = masked_mean(x, None)[:, None]
    assert relative_error(router.last_gates, gates_by_hand(router, x)) < 1e-5
    assert relative_error(router.last_gates, gates_by_hand(router, seen["normed"] if
                                                           preset == "soft_moa" else
                                                           seen["normed"].mean(1, keepdim=True))
                          ) > 1e-3  # not the input norm's output


@pytest.mark.parametrize("config, fragment", [
    (dict(router_scope="module", router_input="residual", parallel_adapter=None,
          prompt_length=None), "router_input='residual' is for layer routers"),
    (dict(router_scope="module", router={"kind": "group"}, parallel_adapter=None,
          prompt_length=None), "a 'group' router gates the adapter groups"),
    (dict(router={"kind": "group", "mode": "topk"}), "one sigmoid gate per adapter group"),
    (dict(router_input="output"), "unknown router_input 'output'"),
])
def test_bad_routing_options_are_refused(config, fragment):
    with pytest.raises(ValueError, match=fragment):
        MoAConfig(**config)
