"""Configuration objects: what experts a layer holds and how its router turns tokens into gates.

`ExpertSpec` describes one adapter expert (or, for `hydra`, one shared-A group of heads),
`RouterConfig` the router and the gating mode, `MoAConfig` a whole model's injection (which
modules, which experts, router scope, layer-level experts) with JSON round-trip and the
published presets. All validate on construction so that a bad value fails where it was
written, with a message that says what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal

EXPERT_KINDS = ("lora", "adapter", "hydra")
ACTIVATIONS = ("silu", "gelu", "relu", "identity")
ROUTER_KINDS = ("linear", "swiglu", "group")
GATES = ("sigmoid", "softmax")
MODES = ("soft", "threshold", "adaptive", "topk")
BACKENDS = ("auto", "reference", "torch", "triton")
ADAPTER_DTYPES = ("base", "float32", "bfloat16", "float16", "float64")
# The largest float16: alpha / r <= alpha then fits every adapter dtype. Published LoRA alphas
# are r to a few times r, so anything near this bound is a mistake, not a setting.
MAX_ALPHA = 65504.0
_WHOLE_NUMBER = re.compile(r"[0-9]+")
_PLAIN_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class ExpertSpec:
    """One adapter expert of a MoALinear.

    kind "lora": delta = (alpha / r) * B (A x), A [r, in], B [out, r].
    kind "adapter": delta = W_up act(W_down x + b_down) + b_up, bottleneck `size`.
    kind "hydra": HydraLoRA, one shared A [r, in] and `heads` B heads [out, r]; it counts as
    `heads` experts, head h giving delta_h = (alpha / r) * B_h (A x).
    activation: None means the kind's default, "silu" for an adapter and "identity" (no
    activation) for lora and hydra, as `ExpertSpec.adapter` and "adapter:16" give.
    """

    kind: str
    size: int
    alpha: float | None = None
    activation: str | None = None
    heads: int = 1

    def __post_init__(self) -> None:
        _check_choice("expert kind", self.kind, EXPERT_KINDS)
        if self.activation is None:
            object.__setattr__(self, "activation",
                               "silu" if self.kind == "adapter" else "identity")
        _check_positive_int(f"{self.kind} {'size' if self.kind == 'adapter' else 'rank'}",
                            self.size)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_positive_int("hydra heads", self.heads)
        if self.kind == "adapter" and self.alpha is not None:
            raise ValueError("an adapter expert has no alpha; alpha is for lora and hydra")
        if self.kind != "adapter" and self.activation != "identity":
            raise ValueError(f"a {self.kind} expert has no activation; use an adapter expert")
        if self.kind != "hydra" and self.heads != 1:
            raise ValueError("heads is only for hydra experts")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float))
                                           and not isinstance(self.alpha, bool)
                                           and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if self.alpha is not None and self.alpha > MAX_ALPHA:
            raise ValueError(f"alpha must be at most {MAX_ALPHA:g} (the largest float16, so "
                             f"that the scaling alpha / r fits every adapter dtype; LoRA "
                             f"alphas are usually r or 2 r), got {self.alpha!r}")

    @classmethod
    def lora(cls, r: int, alpha: float | None = None) -> ExpertSpec:
        """LoRA of rank r, scaled by alpha / r (alpha defaults to r: scaling 1)."""
        return cls("lora", r, alpha)

    @classmethod
    def adapter(cls, size: int, activation: str = "silu") -> ExpertSpec:
        """Bottleneck adapter of width `size` with silu, gelu, relu or identity."""
        return cls("adapter", size, None, activation)

    @classmethod
    def hydra(cls, r: int, heads: int, alpha: float | None = None) -> ExpertSpec:
        """HydraLoRA: one shared A of rank r and `heads` B heads (counts as `heads` experts)."""
        return cls("hydra", r, alpha, "identity", heads)

    @classmethod
    def parse(cls, text: str | ExpertSpec) -> ExpertSpec:
        """Parse "lora:8", "lora:8:16" (r:alpha), "adapter:16", "adapter:16:gelu",
        "hydra:8:8" (r:heads) or "hydra:8:8:16" (r:heads:alpha).

        Sizes, ranks and heads are ASCII digits only ("8", not "+8", "8_0", " 8" or "٨");
        alpha is a plain decimal ("16", "0.5": no sign, exponent, underscore, nan or inf).
        """
        if isinstance(text, ExpertSpec):
            return text
        forms = 'lora:R[:ALPHA], adapter:SIZE[:ACTIVATION], hydra:R:HEADS[:ALPHA]'
        if not isinstance(text, str):
            raise TypeError(f"an expert must be an ExpertSpec or a string like {forms}, "
                            f"got {type(text).__name__}")
        parts = text.strip().split(":")
        kind, args = parts[0].lower(), parts[1:]
        try:
            if kind == "lora" and len(args) in (1, 2):
                return cls.lora(_whole_number("lora rank", args[0]),
                                _plain_decimal(args[1]) if len(args) == 2 else None)
            if kind == "adapter" and len(args) in (1, 2):
                return cls.adapter(_whole_number("adapter size", args[0]),
                                   *(args[1:] and [args[1].lower()]))
            if kind == "hydra" and len(args) in (2, 3):
                alpha = _plain_decimal(args[2]) if len(args) == 3 else None
                return cls.hydra(_whole_number("hydra rank", args[0]),
                                 _whole_number("hydra heads", args[1]), alpha)
        except ValueError as error:
            raise ValueError(f"cannot parse expert {text!r}: {error}; expected one of "
                             f"{forms}") from None
        raise ValueError(f"cannot parse expert {text!r}; expected one of {forms}")

    @property
    def num_experts(self) -> int:
        """How many gated experts this spec contributes (heads for hydra, else 1)."""
        return self.heads

    @property
    def scaling(self) -> float:
        """The factor on the expert's output: alpha / r for lora and hydra, 1 for adapters."""
        if self.kind == "adapter":
            return 1.0
        return (self.alpha if self.alpha is not None else self.size) / self.size

    def __str__(self) -> str:
        if self.kind == "adapter":
            return f"adapter:{self.size}:{self.activation}"
        alpha = "" if self.alpha is None else f":{_exact_number(self.alpha)}"
        if self.kind == "hydra":
            return f"hydra:{self.size}:{self.heads}{alpha}"
        return f"lora:{self.size}{alpha}"


def _whole_number(name: str, text: str) -> int:
    if not _WHOLE_NUMBER.fullmatch(text):
        raise ValueError(f"{name} {text!r} must be written with the digits 0-9 only, such as "
                         f"8 (no sign, space, underscore or other scripts' digits)")
    return int(text)


def _plain_decimal(text: str) -> float:
    if not _PLAIN_DECIMAL.fullmatch(text):
        raise ValueError(f"alpha {text!r} must be a plain decimal number such as 16 or 0.5 "
                         f"(digits 0-9 and one optional point: no sign, exponent, space, "
                         f"underscore, nan or inf)")
    return float(text)


def _exact_number(value: float) -> str:
    """The shortest plain decimal that parses back to exactly `value` ("16", "0.5",
    "0.00001"): what `_plain_decimal` reads."""
    text = format(Decimal(repr(float(value))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_experts(experts) -> list[ExpertSpec]:
    """A list of ExpertSpec or strings (or one comma-separated string) as ExpertSpecs."""
    if not isinstance(experts, (str, ExpertSpec, list, tuple)):
        raise TypeError(f"experts must be a list of ExpertSpecs or strings such as "
                        f"['lora:8', 'adapter:16'], or one comma-separated string; got "
                        f"{type(experts).__name__}")
    if isinstance(experts, (str, ExpertSpec)):
        experts = [e for e in str(experts).split(",")] if isinstance(experts, str) else [experts]
    specs = [ExpertSpec.parse(e) for e in experts]
    if not specs:
        raise ValueError("a MoA layer needs at least one expert")
    return specs


@dataclass(frozen=True)
class RouterConfig:
    """How a router maps a token to expert gates.

    kind: "linear" (z = W x + b), "swiglu" (z = W2 (silu(W1 x + b1) * (W3 x + b3)) + b2
        with hidden = hidden_factor * E), or "group" (UniPELT-style, layer routers only: one
        logit per adapter group of the decoder layer, z_k = w_k . x + b_k, shared by the
        group's experts: every expert of the adapted modules, the parallel adapter, the
        prompt expert; sigmoid gate, soft mode).
    gate: "sigmoid" (paper default) or "softmax" over the experts, giving p.
    mode: "soft" (g = p), "threshold" (Sparse MoA: g = p * [p >= G],
        G = max_threshold * sigmoid(w_G . x + b_G)), "adaptive" (AdaMoLE: a = p - G,
        g = relu-like a / sum), "topk" (keep the top_k largest p, renormalise if
        normalize_topk).
    bias: whether the router's linear layers have biases (False for the bias-free routers of
        the MoLoRA and HydraLoRA baselines). The threshold layer always has a bias.
    learn_threshold: mode "threshold" only. False (the published Sparse MoA): G enters only
        through the comparison, gets no gradient and is frozen (requires_grad False, so DDP
        with find_unused_parameters=False works). True: G trains through a straight-through
        estimator of the mask, d g_e / d G = -p_e on the pairs that run (0 on skipped pairs,
        whose expert output is never computed); the forward values are unchanged.
    """

    kind: str = "swiglu"
    hidden_factor: int = 4
    gate: str = "sigmoid"
    mode: str = "soft"
    max_threshold: float = 0.5
    top_k: int = 2
    normalize_topk: bool = True
    bias: bool = True
    learn_threshold: bool = False

    def __post_init__(self) -> None:
        _check_choice("router kind", self.kind, ROUTER_KINDS)
        _check_choice("gate", self.gate, GATES)
        _check_choice("mode", self.mode, MODES)
        _check_positive_int("hidden_factor", self.hidden_factor)
        _check_positive_int("top_k", self.top_k)
        for name in ("normalize_topk", "bias", "learn_threshold"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.max_threshold, bool) or \
                not isinstance(self.max_threshold, (int, float)) or \
                not 0.0 < self.max_threshold <= 1.0:
            raise ValueError(f"max_threshold must be in (0, 1], got {self.max_threshold!r}")
        if self.learn_threshold and self.mode != "threshold":
            raise ValueError(f"learn_threshold applies to mode 'threshold' (Sparse MoA), not "
                             f"{self.mode!r}" + (": the adaptive threshold always learns, "
                                                 "through a = p - G" if self.mode == "adaptive"
                                                 else ""))
        if self.kind == "group" and (self.gate != "sigmoid" or self.mode != "soft"):
            raise ValueError(f"a 'group' router gives one sigmoid gate per adapter group in "
                             f"soft mode; got gate {self.gate!r} and mode {self.mode!r}")

    @property
    def uses_threshold(self) -> bool:
        """True for the modes with a learned per-token threshold (threshold, adaptive)."""
        return self.mode in ("threshold", "adaptive")

    @property
    def is_sparse(self) -> bool:
        """True for the modes that skip inactive (token, expert) pairs."""
        return self.mode != "soft"

    def check_num_experts(self, num_experts: int) -> None:
        """Raise ValueError when top_k does not fit `num_experts` experts."""
        if self.mode == "topk" and not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (the number of experts), "
                             f"got {self.top_k}")

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RouterConfig:
        """The inverse of to_dict; unknown fields are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown RouterConfig fields: {sorted(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------
# MoAConfig: a whole model's injection
# ---------------------------------------------------------------------------------------

CONFIG_NAME = "moa_config.json"
ROUTER_SCOPES = ("layer", "instance", "module")
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
        _check_choice("router_scope", self.router_scope, ROUTER_SCOPES)
        _check_choice("router_input", self.router_input, ROUTER_INPUTS)
        if self.router_input != "input_norm" and self.router_scope not in LAYER_SCOPES:
            raise ValueError(f"router_input={self.router_input!r} is for layer routers "
                             f"(router_scope 'layer' or 'instance'), got router_scope "
                             f"{self.router_scope!r}")
        if self.router is not None and self.router.kind == "group" and \
                self.router_scope not in LAYER_SCOPES:
            raise ValueError("a 'group' router gates the adapter groups of a decoder layer; "
                             "it needs router_scope 'layer' or 'instance'")
        _check_choice("backend", self.backend, BACKENDS)
        if self.adapter_dtype is not None:
            _check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        _check_choice("parallel_adapter_activation", self.parallel_adapter_activation,
                      ACTIVATIONS)
        for name in ("parallel_adapter", "prompt_length"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_positive_int(name, value)
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
        from moa.serialization import write_file_atomically

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
                "router_scope": "module", "parallel_adapter": None, "prompt_length": None},
    "topk_moelora": {"experts": _EIGHT_LORAS, "router": _module_router(mode="topk", top_k=2),
                     "router_scope": "module", "parallel_adapter": None,
                     "prompt_length": None},
}


__all__ = ["CONFIG_NAME", "PRESETS", "ExpertSpec", "MoAConfig", "RouterConfig",
           "layer_index", "module_matches", "parse_experts"]
