"""The configuration of one MoALinear: `ExpertSpec` describes one adapter expert (or, for
`hydra`, one shared-A group of heads), `RouterConfig` the router and the gating mode. Both
validate on construction so that a bad value fails where it was written, with a message
that says what is allowed. moa/config.py's MoAConfig (a whole model's injection) is built
from them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from decimal import Decimal

from moa_kernels.activations import ACTIVATION_NAMES
from moa_kernels.layout import EXPERT_KINDS as KIND_CODES

EXPERT_KINDS = tuple(KIND_CODES)  # names of the kinds (moa_kernels.layout's table)
ACTIVATIONS = ACTIVATION_NAMES  # names of the activations (moa_kernels.activations' table)
ROUTER_KINDS = ("linear", "swiglu", "group")
GATES = ("sigmoid", "softmax")
MODES = ("soft", "threshold", "adaptive", "topk")
# The largest float16: alpha / r <= alpha then fits every adapter dtype. Published LoRA alphas
# are r to a few times r, so anything near this bound is a mistake, not a setting.
MAX_ALPHA = 65504.0
_WHOLE_NUMBER = re.compile(r"[0-9]+")
_PLAIN_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ValueError unless value is one of `allowed` (the message lists them)."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def check_positive_int(name: str, value: int) -> None:
    """Raise ValueError unless value is an integer >= 1 (bools refused)."""
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
        check_choice("expert kind", self.kind, EXPERT_KINDS)
        if self.activation is None:
            object.__setattr__(self, "activation",
                               "silu" if self.kind == "adapter" else "identity")
        check_positive_int(f"{self.kind} {'size' if self.kind == 'adapter' else 'rank'}",
                            self.size)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_positive_int("hydra heads", self.heads)
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
        check_choice("router kind", self.kind, ROUTER_KINDS)
        check_choice("gate", self.gate, GATES)
        check_choice("mode", self.mode, MODES)
        check_positive_int("hidden_factor", self.hidden_factor)
        check_positive_int("top_k", self.top_k)
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



__all__ = ["ACTIVATIONS", "EXPERT_KINDS", "GATES", "MAX_ALPHA", "MODES", "ROUTER_KINDS",
           "ExpertSpec", "RouterConfig", "check_choice", "check_positive_int", "parse_experts"]
