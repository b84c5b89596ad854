"""Presets: published parameter counts on the LLaMA-3.1-8B shape, and on a tiny Llama each
preset trains, round-trips through save/load bitwise, and disables to the base exactly."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moa import MoAConfig, MoAModel, get_moa_model
from moa.config import PRESETS
from tests.moa.tiny import VOCAB, perturb, tiny_llama, token_batch

LLAMA_3_1_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128)

# Per layer on that shape: q and o are 4096 -> 4096, k and v 4096 -> 1024, down 14336 -> 4096.
# adamole = molora + a Linear(in, 1) threshold per module: 32 * (4 * 4097 + 14337).
# topk_moelora has molora's tensors.
PUBLISHED_COUNTS = {
    "soft_moa": 24_520_288,
    "sparse_moa": 22_289_120,
    "lora": 23_068_672,
    "hydralora": 45_088_768,
    "molora": 100_139_008,
    "adamole": 100_139_008 + 32 * (4 * 4097 + 14337),
    "topk_moelora": 100_139_008,
}


# Sparse MoA's thresholds (a Linear(4096, 1) per layer router) are counted in the published
# total, but the published method never updates them: they are frozen, and shown apart.
FROZEN_THRESHOLDS = {"sparse_moa": 32 * 4097}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_trainable_parameters_on_the_llama_3_1_8b_shape(name, capsys):
    with torch.device("meta"):
        model = LlamaForCausalLM(LLAMA_3_1_8B)
    moa = get_moa_model(model, MoAConfig.preset(name))
    frozen = FROZEN_THRESHOLDS.get(name, 0)
    assert moa.frozen_moa_parameter_count() == frozen
    assert moa.trainable_parameter_count() + frozen == PUBLISHED_COUNTS[name]
    assert sum(p.numel() for _, p in moa.moa_named_parameters()) == PUBLISHED_COUNTS[name]
    moa.print_trainable_parameters()
    apart = f" (+ {frozen:,d} frozen thresholds)" if frozen else ""
    assert capsys.readouterr().out.startswith(
        f"trainable params: {PUBLISHED_COUNTS[name] - frozen:,d}{apart} || ")


def test_soft_moa_count_per_layer_breaks_down_as_published():
    with torch.device("meta"):
        model = LlamaForCausalLM(LLAMA_3_1_8B)
    moa = get_moa_model(model, MoAConfig.preset("soft_moa"))
    layer = moa.model.model.layers[0]
    count = lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad)  # noqa: E731
    assert count(layer.moa_router) == 229_635  # swiglu, hidden 4 * 7 = 28, over 7 experts
    assert sum(count(getattr(layer.self_attn, n)) for n in ("q_proj", "k_proj", "v_proj",
                                                            "o_proj")) \
        + count(layer.mlp.down_proj) == 360_448
    assert count(layer.moa_parallel_adapter) == 135_184
    assert count(layer.self_attn.moa_prompt) == 10 * 4096 + 32


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_trains_saves_reloads_and_disables(name, tmp_path):
    base_logits = None
    ids = token_batch(4, 12, seed=3)
    with torch.no_grad():
        base_logits = tiny_llama()(ids).logits
    moa = get_moa_model(tiny_llama(), MoAConfig.preset(name))
    moa.train()
    optimizer = torch.optim.AdamW([p for p in moa.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = moa(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses

    moa.eval()
    with torch.no_grad():
        trained = moa(ids).logits
        with moa.disable_adapters():
            disabled = moa(ids).logits
        after = moa(ids).logits
    assert torch.equal(disabled, base_logits)
    assert torch.equal(after, trained)
    assert not torch.equal(trained, base_logits)

    moa.save_pretrained(tmp_path)
    reloaded = MoAModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained)
    assert reloaded.trainable_parameter_count() == moa.trainable_parameter_count()


def test_perturbed_presets_differ_from_the_base():
    # every preset's adapters reach the output once their tensors move from the init
    ids = token_batch(2, 7)
    with torch.no_grad():
        base = tiny_llama()(ids).logits
    for name in sorted(PRESETS):
        moa = get_moa_model(tiny_llama(), MoAConfig.preset(name))
        perturb(moa)
        with torch.no_grad():
            logits = moa(ids).logits
        assert logits.shape == (2, 7, VOCAB)
        assert (logits - base).abs().max() > 1e-3, name
