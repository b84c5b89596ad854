"""MoAConfig: defaults, JSON round-trip, module matching, and errors that say what is allowed."""

import json

import pytest

from moa import ExpertSpec, MoAConfig, RouterConfig
from moa.config import CONFIG_NAME, PRESETS, layer_index, module_matches


def test_defaults_are_the_paper_soft_moa():
    config = MoAConfig()
    assert config == MoAConfig.preset("soft_moa")
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    assert config.experts == [ExpertSpec.lora(8, 8)]
    assert config.router == RouterConfig(kind="swiglu", hidden_factor=4, gate="sigmoid",
                                         mode="soft")
    assert (config.router_scope, config.parallel_adapter, config.prompt_length) == \
        ("layer", 16, 10)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    config = MoAConfig.preset(name)
    text = config.to_json_string()
    assert MoAConfig.from_json_string(text) == config
    assert json.loads(text) == config.to_dict()  # plain JSON, nothing pickled


def test_a_custom_config_round_trips_through_a_directory(tmp_path):
    config = MoAConfig(
        target_modules=r".*\.(q_proj|down_proj)", exclude_modules=["layers.0.mlp.down_proj"],
        layers_to_transform=[0, 1],
        experts={"*": ["lora:4"], "down_proj": ["lora:8:16", "adapter:8:gelu", "hydra:2:3"]},
        router=RouterConfig(kind="linear", gate="softmax", mode="topk", top_k=2, bias=False),
        router_scope="module", parallel_adapter=None, prompt_length=None, aux_loss_coef=0.01,
        dropout=0.1, backend="torch")
    path = config.save_pretrained(tmp_path / "adapter")
    assert path.endswith(CONFIG_NAME)
    loaded = MoAConfig.from_pretrained(tmp_path / "adapter")
    assert loaded == config
    assert loaded.experts_for("model.layers.1.mlp.down_proj")[2] == ExpertSpec.hydra(2, 3)


def test_preset_overrides_replace_fields():
    config = MoAConfig.preset("sparse_moa", aux_loss_coef=0.01, layers_to_transform=3)
    assert config.router.mode == "threshold" and config.router.max_threshold == 0.5
    assert config.prompt_length is None
    assert config.aux_loss_coef == 0.01 and config.layers_to_transform == [3]


def test_baseline_presets_use_module_routers_as_published():
    assert MoAConfig.preset("lora").router is None
    for name in ("molora", "hydralora", "adamole", "topk_moelora"):
        config = MoAConfig.preset(name)
        assert config.router_scope == "module"
        assert (config.router.kind, config.router.gate, config.router.bias) == \
            ("linear", "softmax", False)
    assert MoAConfig.preset("adamole").router.max_threshold == 1 / 8
    assert MoAConfig.preset("adamole").router.mode == "adaptive"
    assert MoAConfig.preset("topk_moelora").router.top_k == 2


def test_module_matching_is_peft_style():
    name = "model.layers.12.self_attn.q_proj"
    assert module_matches(name, ["q_proj"])  # dotted suffix
    assert module_matches(name, ["self_attn.q_proj"])
    assert module_matches(name, [name])  # exact
    assert not module_matches(name, ["proj"])  # a suffix must be whole components
    assert module_matches(name, r".*q_proj")  # a string is a full-match regex
    assert not module_matches(name, r"q_proj")
    assert layer_index(name) == 12 and layer_index("lm_head") is None


def test_exclude_and_layers_filter_targets():
    config = MoAConfig(exclude_modules=["layers.1.self_attn.k_proj"], layers_to_transform=[1])
    assert config.is_target("model.layers.0.self_attn.k_proj")
    assert not config.is_target("model.layers.1.self_attn.k_proj")
    assert not config.in_layers("model.layers.0.self_attn.q_proj")
    assert config.in_layers("model.layers.1.self_attn.q_proj")


def test_experts_dict_takes_the_longest_suffix_then_the_default():
    config = MoAConfig(experts={"*": ["lora:2"], "proj": ["lora:3"],
                                "mlp.down_proj": ["adapter:4"], "down_proj": ["lora:5"]})
    assert config.experts_for("model.layers.0.mlp.down_proj") == [ExpertSpec.adapter(4)]
    assert config.experts_for("model.layers.0.attn.down_proj") == [ExpertSpec.lora(5)]
    assert config.experts_for("model.layers.0.self_attn.q_proj") == [ExpertSpec.lora(2)]
    with pytest.raises(ValueError, match="no experts for module 'x.q_proj'.*'down_proj'"):
        MoAConfig(experts={"down_proj": ["lora:5"]}).experts_for("x.q_proj")


@pytest.mark.parametrize("kwargs, message", [
    # each row: a bad field, and what the error must say
    ({"router_scope": "global"}, "unknown router_scope 'global'; allowed: layer, instance, module"),
    ({"router_scope": "module"}, "parallel_adapter is a layer-level expert"),
    ({"router": RouterConfig(mode="threshold")}, "prompt expert is only used with a soft"),
    ({"router": None, "aux_loss_coef": 0.1}, "aux_loss_coef > 0 needs a router"),
    ({"aux_loss_coef": -1.0}, "aux_loss_coef must be a finite number >= 0"),
    ({"aux_loss_coef": float("inf")}, "aux_loss_coef must be a finite number >= 0"),
    ({"aux_loss_coef": True},
     "aux_loss_coef must be a finite number >= 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"target_modules": "q_proj("}, "not a valid regex"),
    ({"target_modules": []}, "target_modules is empty"),
    ({"target_modules": [3]}, "target_modules must be a regex string or a list"),
    ({"layers_to_transform": [-1]}, "layers_to_transform must be None or a non-empty list"),
    ({"experts": ["lora:0"]}, "lora rank must be an integer >= 1"),
    ({"experts": {}}, "experts is an empty dict"),
    ({"experts": {"q_proj": ["conv:3"]}}, r"experts\['q_proj'\]: cannot parse expert"),
    ({"prompt_length": 0}, "prompt_length must be an integer >= 1"),
    ({"backend": "cuda"}, "unknown backend 'cuda'"),
    ({"router": 3}, "router must be a RouterConfig"),
])
def test_bad_fields_fail_with_what_is_allowed(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MoAConfig(**kwargs)


@pytest.mark.parametrize("alpha", [1 / 3, 12345.678, 16.0, 0.1, 1e-05, 65504.0])
def test_alpha_survives_the_json_round_trip_exactly(alpha):
    config = MoAConfig(experts=[ExpertSpec.lora(4, alpha), ExpertSpec.hydra(2, 3, alpha)])
    again = MoAConfig.from_json_string(config.to_json_string())
    assert again == config
    assert [spec.alpha for spec in again.experts] == [alpha, alpha]
    assert "e" not in str(config.experts[0]).split(":")[2]  # plain decimal, as parse reads


@pytest.mark.parametrize("text, spec", [
    ("lora:8", ExpertSpec.lora(8)),
    ("LORA:08:16", ExpertSpec.lora(8, 16.0)),  # kind is case-blind; a leading zero is fine
    ("lora:8:.5", ExpertSpec.lora(8, 0.5)),
    ("lora:8:16.", ExpertSpec.lora(8, 16.0)),
    (" hydra:4:2:65504 ", ExpertSpec.hydra(4, 2, 65504.0)),  # around the text: stripped
    ("adapter:16:GELU", ExpertSpec.adapter(16, "gelu")),
])
def test_plain_expert_strings_parse(text, spec):
    assert ExpertSpec.parse(text) == spec


def test_a_comma_separated_experts_string_may_have_spaces_after_commas():
    assert MoAConfig(experts="lora:8, adapter:16").experts == [ExpertSpec.lora(8),
                                                               ExpertSpec.adapter(16)]


def test_alpha_must_be_a_number_not_a_bool():
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got True"):
        ExpertSpec.lora(8, True)


def test_bad_presets_and_dicts_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'moe'; allowed: soft_moa"):
        MoAConfig.preset("moe")
    with pytest.raises(ValueError, match=r"unknown MoAConfig fields in overrides: \['rank'\]"):
        MoAConfig.preset("lora", rank=4)
    with pytest.raises(ValueError, match=r"unknown MoAConfig fields: \['rank'\]"):
        MoAConfig.from_dict({**MoAConfig().to_dict(), "rank": 4})
    with pytest.raises(ValueError, match=r"unknown RouterConfig fields: \['depth'\]"):
        MoAConfig.from_dict({"router": {"depth": 2}})
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        MoAConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        MoAConfig.from_pretrained(tmp_path)
