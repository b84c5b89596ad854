"""moa/cli/tiny_models.py: the one tiny-Llama builder gives, for each caller, bit for bit the
model its own builder gave before there was one (demo.py build_demo_model, loading.py
build_text_model, bench.py build_llama): the references below are those builders as they
were, written out."""

import pytest
import torch

from moa.cli.bench import MODEL_FULL, MODEL_QUICK, build_llama
from moa.cli.demo import build_demo_model
from moa.cli.loading import build_text_model


def reference_demo_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=172,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    return model


def reference_text_model(hidden_size: int, num_layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=258, hidden_size=hidden_size,
                         intermediate_size=hidden_size * 3, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=256, pad_token_id=257)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
    model.config._name_or_path = "moa-embedded-text-llama"
    model.generation_config.pad_token_id = 257
    model.generation_config.eos_token_id = 256
    return model


def reference_bench_llama(shape, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                         intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=max(512, shape.sequence))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def built(build):
    """build()'s model and a draw of the global RNG after it (what the caller's next random
    numbers, e.g. the adapters' initialisation, would be), from the same RNG state before."""
    torch.manual_seed(1234)
    model = build()
    return model, torch.rand(8)


CASES = [
    pytest.param(lambda: build_demo_model(0), lambda: reference_demo_model(0), id="demo-seed-0"),
    pytest.param(lambda: build_demo_model(3), lambda: reference_demo_model(3), id="demo-seed-3"),
    pytest.param(lambda: build_text_model(), lambda: reference_text_model(64, 2),
                 id="text-model-default"),
    pytest.param(lambda: build_text_model(32, 1), lambda: reference_text_model(32, 1),
                 id="text-model-hidden-32-one-layer"),
    pytest.param(lambda: build_llama(MODEL_QUICK, torch.device("cpu"), 0),
                 lambda: reference_bench_llama(MODEL_QUICK, 0), id="bench-quick-seed-0"),
    pytest.param(lambda: build_llama(MODEL_QUICK, torch.device("cpu"), 5),
                 lambda: reference_bench_llama(MODEL_QUICK, 5), id="bench-quick-seed-5"),
    pytest.param(lambda: build_llama(MODEL_FULL, torch.device("cpu"), 0),
                 lambda: reference_bench_llama(MODEL_FULL, 0), id="bench-full-seed-0"),
]


@pytest.mark.parametrize("build, reference", CASES)
def test_the_builder_gives_each_caller_its_old_model(build, reference):
    model, rng_after = built(build)
    expected, expected_rng_after = built(reference)
    state, expected_state = model.state_dict(), expected.state_dict()
    assert list(state) == list(expected_state)
    for name, tensor in expected_state.items():
        assert state[name].dtype == tensor.dtype and state[name].shape == tensor.shape, name
        assert torch.equal(state[name], tensor), name  # bit for bit
    assert model.config.to_dict() == expected.config.to_dict()
    assert model.generation_config.to_dict() == expected.generation_config.to_dict()
    assert model.training == expected.training
    assert torch.equal(rng_after, expected_rng_after)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == \
        (expected.lm_head.weight is expected.model.embed_tokens.weight)


def test_the_seed_sets_the_weights():
    # different seeds give different weights, so the comparisons above can tell seeds apart
    first, second = build_demo_model(0), build_demo_model(3)
    assert not torch.equal(first.lm_head.weight, second.lm_head.weight)
