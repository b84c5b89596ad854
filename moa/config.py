"""Configuration of a whole model's injection: `MoAConfig` (which modules, which experts,
router scope, layer-level experts) with JSON round-trip and the published presets
(`MoAConfig.preset`). A layer's own configuration, `ExpertSpec` and `RouterConfig`, lives in
moa/layer_config.py and is re-exported here. Everything validates on construction so that a
bad value fails where it was written, with a message that says what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields

from moa.io import write_file_atomically
from moa.layer_config import (  # (EXPERT_KINDS, GATES, MODES, ROUTER_KINDS: re-exported)
    ACTIVATIONS,
    EXPERT_KINDS,
    GATES,
    MAX_ALPHA,
    MODES,
    ROUTER_KINDS,
    ExpertSpec,
    RouterConfig,
    check_choice,
    check_positive_int,
    parse_experts,
)
from moa_kernels.contract import BACKEND_CHOICES

BACKENDS = BACKEND_CHOICES  # "auto" and the registry's backends (moa_kernels/contract.py)
ADAPTER_DTYPES = ("base", "float32", "bfloat16", "float16", "float64")


# ---------------------------------------------------------------------------------------
# MoAConfig: a whole model's injection
# ---------------------------------------------------------------------------------------

# The two files of a saved adapter (moa/serialization.py writes them).
CONFIG_NAME = "moa_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ROUTER_SCOPES = ("layer", "instance", "module")
AUX_LOSS_REDUCTIONS = ("mean", "sum")
ROUTER_INPUTS = ("input_norm", "residual")
LAYER_SCOPES = ("layer", "instance")
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
DEFAULT_EXPERT_KEY = "*"


def _paper_targets() -> list[str]:
    return list(PAPER_TARGETS)


def _paper_experts() -> list[ExpertSpec]:
    return [ExpertSpec.lora(8, 8.0)]


def module_matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT-style matching: a string is a regex that must match the whole module name; a list
    matches a name exactly or as a dotted suffix ("q_proj" matches "model.layers.0.q_proj").
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str) -> int | None:
    """The decoder-layer index of a module name: its first all-digit dotted component
    ("model.layers.3.mlp.down_proj" -> 3), or None."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _layer_list(value) -> list[int]:
    """layers_to_transform as a list: one index, or a list, tuple, range or set of them."""
    allowed = ("layers_to_transform must be None or a non-empty list of layer indices "
               "(integers >= 0; one integer for a single layer)")
    if isinstance(value, int) and not isinstance(value, bool):
        layers = [value]
    elif isinstance(value, (list, tuple, range, set, frozenset)):
        layers = list(value)
    else:
        raise ValueError(f"{allowed}, got {value!r}, a {type(value).__name__}")
    if not layers:
        raise ValueError(f"{allowed}, got an empty {type(value).__name__}")
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{allowed}, got {value!r}: {index!r} is a "
                             f"{type(index).__name__}")
        if index < 0:
            raise ValueError(f"{allowed}, got {value!r}: {index} is negative")
    return sorted(layers) if isinstance(value, (set, frozenset)) else layers


@dataclass
class MoAConfig:
    """How `get_moa_model` turns a transformers model into a MoA model.

    The defaults are the paper's Soft MoA (docs/DESIGN.md section 4); `MoAConfig.preset` gives the
    published variants and baselines.

    Fields:
        target_modules: the nn.Linear modules to adapt: a list of names or dotted suffixes
            ("q_proj" matches "model.layers.0.self_attn.q_proj"), or a regex string that must
            match the whole module name.
        exclude_modules: modules to leave alone, matched the same way (None: none).
        layers_to_transform: decoder-layer indices to adapt (the first all-digit component of
            a module name); None adapts every layer.
        experts: the experts of each adapted module: a list of ExpertSpecs or strings such
            as "lora:8:8", "adapter:16", "hydra:8:8", or a dict keyed by module suffix
            (longest suffix wins; key "*" is the default) where modules differ.
        router: the RouterConfig, or None for no router (every expert always on, gate 1:
            plain LoRA or adapters).
        router_scope: "layer": one router per decoder layer reads the layer's input-norm
            output and gates every expert of the layer per token (each module takes its
            slice); "instance": the same router reads the mean over the sequence of that
            input (padding left out through the attention mask) and gives one gate vector
            per sequence, used by every token (during training it reads the whole sequence,
            future tokens included, as published; in generate it is computed from the prompt
            and reused at every decoding step); "module": every adapted module has its own
            router on its own input.
        router_input: what the layer router reads (scopes "layer" and "instance"):
            "input_norm", the output of the decoder layer's input norm, or "residual", the
            decoder layer's input before that norm (the published LLaMA-3 code).
        parallel_adapter: bottleneck size of a parallel adapter beside each MLP (input: the
            MLP's input, output added to the MLP's), or None. Needs router_scope "layer".
        parallel_adapter_activation: its activation ("silu", "gelu", "relu", "identity").
        prompt_length: number of learned prompt vectors of the prompt expert in each
            attention module (Llama, Mistral, Qwen2, Qwen3), or None. Needs router_scope
            "layer" and a soft router (the sparse variants do not use it).
        aux_loss_coef: weight of the switch-style load-balancing loss added to the model's
            loss (0 disables). With router_scope "module" the routers then run just before
            their MoALinear (to keep the gates' graph) and pass the gates in: the same math,
            sparse modes still skipping inactive experts, but the router's first layer is a
            matmul of its own instead of sharing the experts' shrink GEMM. Padding (the
            zeros of a 2-D attention_mask given to MoAModel's forward) does not count.
            For routers that select experts (top-k, threshold, adaptive) it is computed on
            their scores before selection and their selections, as the published MoE-LoRA
            baselines define it (moa/modules/aux_loss.py).
        aux_loss_reduction: how the router calls' losses combine: "mean" (the default) or
            "sum" (as the published MoE-LoRA code adds up its layers' losses).
        dropout: dropout probability on the experts' input.
        backend: MoALinear backend: "auto", "reference", "torch" or "triton".
        adapter_dtype: dtype of every MoA tensor: None (float32 beside a half-precision or
            quantized base, else the base's dtype), "base" (the base's compute dtype: a
            4-bit layer's bnb_4bit_compute_dtype, else its weight's dtype), or one of
            "float32", "bfloat16", "float16", "float64".
    """

    target_modules: list[str] | str = field(default_factory=_paper_targets)
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    experts: list[ExpertSpec] | dict[str, list[ExpertSpec]] = field(
        default_factory=_paper_experts)
    router: RouterConfig | None = field(default_factory=RouterConfig)
    router_scope: str = "layer"
    router_input: str = "input_norm"
    parallel_adapter: int | None = 16
    parallel_adapter_activation: str = "silu"
    prompt_length: int | None = 10
    aux_loss_coef: float = 0.0
    aux_loss_reduction: str = "mean"
    dropout: float = 0.0
    backend: str = "auto"
    adapter_dtype: str | None = None

    def __post_init__(self) -> None:
        self.target_modules = self._patterns("target_modules", self.target_modules)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is empty; name at least one module")
        if self.exclude_modules is not None:
            self.exclude_modules = self._patterns("exclude_modules", self.exclude_modules)
        if self.layers_to_transform is not None:
            self.layers_to_transform = _layer_list(self.layers_to_transform)
        self.experts = self._parse_experts(self.experts)
        if isinstance(self.router, dict):
            self.router = RouterConfig.from_dict(self.router)
        if self.router is not None and not isinstance(self.router, RouterConfig):
            raise TypeError("router must be a RouterConfig, a dict of its fields or None, "
                            f"got {type(self.router).__name__}")
        check_choice("router_scope", self.router_scope, ROUTER_SCOPES)
        check_choice("router_input", self.router_input, ROUTER_INPUTS)
        if self.router_input != "input_norm" and self.router_scope not in LAYER_SCOPES:
            raise ValueError(f"router_input={self.router_input!r} is for layer routers "
                             f"(router_scope 'layer' or 'instance'), got router_scope "
                             f"{self.router_scope!r}")
        if self.router is not None and self.router.kind == "group" and \
                self.router_scope not in LAYER_SCOPES:
            raise ValueError("a 'group' router gates the adapter groups of a decoder layer; "
                             "it needs router_scope 'layer' or 'instance'")
        check_choice("backend", self.backend, BACKENDS)
        if self.adapter_dtype is not None:
            check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        check_choice("parallel_adapter_activation", self.parallel_adapter_activation,
                      ACTIVATIONS)
        for name in ("parallel_adapter", "prompt_length"):
            value = getattr(self, name)
            if value is None:
                continue
            check_positive_int(name, value)
            if self.router_scope not in LAYER_SCOPES:
                raise ValueError(f"{name} is a layer-level expert gated by the layer router; "
                                 "it needs router_scope 'layer' or 'instance' (set it to "
                                 "None for router_scope='module')")
        if self.prompt_length is not None and self.router is not None and \
                self.router.mode != "soft":
            raise ValueError(f"the prompt expert is only used with a soft router (mode "
                             f"'soft'), got mode {self.router.mode!r}; set prompt_length=None")
        if isinstance(self.aux_loss_coef, bool) or not isinstance(self.aux_loss_coef,
                                                                   (int, float)) \
                or not 0 <= self.aux_loss_coef < math.inf:
            raise ValueError(f"aux_loss_coef must be a finite number >= 0, got "
                             f"{self.aux_loss_coef!r}")
        check_choice("aux_loss_reduction", self.aux_loss_reduction, AUX_LOSS_REDUCTIONS)
        if self.aux_loss_coef > 0 and self.router is None:
            raise ValueError("aux_loss_coef > 0 needs a router; this config has router=None")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"dropout must be a number in [0, 1) such as 0.1 (0 for none), "
                             f"got {self.dropout!r}, a {type(self.dropout).__name__}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @staticmethod
    def _patterns(name: str, value) -> list[str] | str:
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{name} {value!r} is not a valid regex: {error}") from None
            return value
        if isinstance(value, (list, tuple, set, frozenset)) and \
                all(isinstance(v, str) and v for v in value):
            return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        raise TypeError(f"{name} must be a regex string or a list of module names, "
                        f"got {value!r}")

    @staticmethod
    def _parse_experts(experts):
        if isinstance(experts, dict):
            if not experts:
                raise ValueError("experts is an empty dict; give at least one module suffix "
                                 f"(or {DEFAULT_EXPERT_KEY!r} for the default)")
            parsed = {}
            for key, value in experts.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"experts keys must be module suffixes, got {key!r}")
                try:
                    parsed[key] = parse_experts(value)
                except ValueError as error:
                    raise ValueError(f"experts[{key!r}]: {error}") from None
            return parsed
        return parse_experts(experts)

    # ---- per-module lookups ------------------------------------------------------------

    def is_target(self, name: str) -> bool:
        """Whether module `name` is targeted and not excluded (layers not checked here)."""
        if not module_matches(name, self.target_modules):
            return False
        return self.exclude_modules is None or not module_matches(name, self.exclude_modules)

    def in_layers(self, name: str) -> bool:
        """Whether module `name` lies in a layer of layers_to_transform (always, if None)."""
        return self.layers_to_transform is None or layer_index(name) in self.layers_to_transform

    def experts_for(self, name: str) -> list[ExpertSpec]:
        """The expert specs of module `name` (a dict's longest matching suffix wins)."""
        if not isinstance(self.experts, dict):
            return list(self.experts)
        matches = [k for k in self.experts if name == k or name.endswith("." + k)]
        if matches:
            return list(self.experts[max(matches, key=len)])
        if DEFAULT_EXPERT_KEY in self.experts:
            return list(self.experts[DEFAULT_EXPERT_KEY])
        raise ValueError(f"no experts for module {name!r}: experts has keys "
                         f"{sorted(self.experts)}; add its suffix or a "
                         f"{DEFAULT_EXPERT_KEY!r} default")

    # ---- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-able dict (experts as strings such as "lora:8:8", router as a dict)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.experts, dict):
            data["experts"] = {k: [str(e) for e in v] for k, v in self.experts.items()}
        else:
            data["experts"] = [str(e) for e in self.experts]
        data["router"] = None if self.router is None else self.router.to_dict()
        for name in ("target_modules", "exclude_modules", "layers_to_transform"):
            if isinstance(data[name], list):
                data[name] = list(data[name])
        if data["aux_loss_reduction"] == "mean":  # (left out at its default, so that a
            del data["aux_loss_reduction"]  # config reads as it did before the field came)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MoAConfig:
        """The inverse of to_dict; unknown fields are an error, never ignored."""
        if not isinstance(data, dict):
            raise TypeError(f"a MoAConfig dict is expected, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown MoAConfig fields: {sorted(unknown)}; allowed: "
                             f"{', '.join(f.name for f in fields(cls))}")
        return cls(**data)

    def to_json_string(self) -> str:
        """to_dict as indented JSON with sorted keys (what moa_config.json holds)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> MoAConfig:
        """The inverse of to_json_string."""
        return cls.from_dict(json.loads(text))

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write `moa_config.json` into `directory` (created if needed); returns its path.
        The file is replaced atomically: an interrupted or failed write leaves the previous
        one. Beside an adapter's weights, MoAModel.save_pretrained is the way to change it (a
        config that is not the weights' own is refused on loading)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        write_file_atomically(path, self.to_json_string().encode("utf-8"))
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MoAConfig:
        """Read `moa_config.json` from `directory`. A file that is not UTF-8 JSON of a
        MoAConfig is a ValueError (TypeError for JSON that is not an object) naming it."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
        expected = "expected the JSON object that MoAConfig.save_pretrained writes"
        with open(path, "rb") as handle:
            raw = handle.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at "
                             f"offset {error.start}); {expected}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            problem = "is empty" if not text.strip() else f"is not valid JSON: {error}"
            raise ValueError(f"{path} {problem}; {expected}") from None
        try:
            return cls.from_dict(data)
        except TypeError as error:
            raise TypeError(f"{path}: {error}; {expected}") from None
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    # ---- presets -------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> MoAConfig:
        """A published configuration, with fields overridden by keyword.

        soft_moa: layer router SwiGLU x4, sigmoid, soft; lora r=8 alpha=8 on q, k, v, o,
            down; parallel adapter 16 (SiLU); prompt 10.
        sparse_moa: the same with mode "threshold" (max 0.5) and no prompt expert.
        instance_moa: soft_moa with instance routing (one gate vector per sequence, from
            the mean of the input-norm outputs).
        unipeft: UniPELT-style: lora r=8 alpha=8 on q, k, v, o, down, parallel adapter 16,
            prompt 10, and per decoder layer one sigmoid gate per group on the sequence
            mean: the LoRA modules, the prompt, the parallel adapter (the published code
            feeds the parallel adapter from the prompt's gate; here each group has its own).
        lora: plain LoRA r=16 (alpha 16) on the same modules, no router.
        molora: 8 x lora r=8 per module, bias-free linear softmax router per module, soft.
        hydralora: shared A, 8 B heads, r=8, bias-free linear softmax router per module.
        adamole: 8 x lora r=8, bias-free linear softmax router per module, adaptive
            threshold with max 1/8.
        topk_moelora: 8 x lora r=8, bias-free linear softmax router per module, top-2.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown MoAConfig fields in overrides: {sorted(unknown)}; "
                             f"allowed: {', '.join(f.name for f in fields(cls))}")
        values.update(overrides)
        return cls(**values)


def _module_router(**kwargs) -> RouterConfig:
    return RouterConfig(kind="linear", gate="softmax", bias=False, **kwargs)


_EIGHT_LORAS = ["lora:8:8"] * 8

# The published top-k and adaptive MoE-LoRA baselines (DCDmllm/MoA's MoA_Transformers/src
# mole and adamole, trained with --aux_loss_coeff=1e-3) add 1e-3 times the sum of their
# layers' load-balancing losses.
_PUBLISHED_BALANCE = {"aux_loss_coef": 1e-3, "aux_loss_reduction": "sum"}

# Field values of each preset (everything not named takes the MoAConfig default, which is
# Soft MoA). Counts on the LLaMA-3.1-8B shape are in docs/DESIGN.md section 4.
PRESETS: dict[str, dict] = {
    "soft_moa": {},
    "sparse_moa": {"router": RouterConfig(mode="threshold", max_threshold=0.5),
                   "prompt_length": None},
    "instance_moa": {"router_scope": "instance"},
    "unipeft": {"router": RouterConfig(kind="group"), "router_scope": "instance"},
    "lora": {"experts": ["lora:16:16"], "router": None, "router_scope": "module",
             "parallel_adapter": None, "prompt_length": None},
    "molora": {"experts": _EIGHT_LORAS, "router": _module_router(), "router_scope": "module",
               "parallel_adapter": None, "prompt_length": None},
    "hydralora": {"experts": ["hydra:8:8:8"], "router": _module_router(),
                  "router_scope": "module", "parallel_adapter": None, "prompt_length": None},
    "adamole": {"experts": _EIGHT_LORAS,
                "router": _module_router(mode="adaptive", max_threshold=1 / 8),
                "router_scope": "module", "parallel_adapter": None, "prompt_length": None,
                **_PUBLISHED_BALANCE},
    "topk_moelora": {"experts": _EIGHT_LORAS, "router": _module_router(mode="topk", top_k=2),
                     "router_scope": "module", "parallel_adapter": None,
                     "prompt_length": None, **_PUBLISHED_BALANCE},
}


__all__ = ["ACTIVATIONS", "ADAPTER_DTYPES", "BACKENDS", "CONFIG_NAME", "EXPERT_KINDS", "GATES",
           "MAX_ALPHA", "MODES", "PRESETS", "ROUTER_KINDS", "WEIGHTS_NAME", "ExpertSpec",
           "MoAConfig", "RouterConfig", "layer_index", "module_matches", "parse_experts"]
