"""Configuration objects: what experts a layer holds and how its router turns tokens into gates.

`ExpertSpec` describes one adapter expert (or, for `hydra`, one shared-A group of heads),
`RouterConfig` the router and the gating mode. Both validate on construction so that a bad
value fails where it was written, with a message that says what is allowed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EXPERT_KINDS = ("lora", "adapter", "hydra")
ACTIVATIONS = ("silu", "gelu", "relu", "identity")
ROUTER_KINDS = ("linear", "swiglu")
GATES = ("sigmoid", "softmax")
MODES = ("soft", "threshold", "adaptive", "topk")


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
    """

    kind: str
    size: int
    alpha: float | None = None
    activation: str = "identity"
    heads: int = 1

    def __post_init__(self) -> None:
        _check_choice("expert kind", self.kind, EXPERT_KINDS)
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
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")

    @classmethod
    def lora(cls, r: int, alpha: float | None = None) -> ExpertSpec:
        return cls("lora", r, alpha)

    @classmethod
    def adapter(cls, size: int, activation: str = "silu") -> ExpertSpec:
        return cls("adapter", size, None, activation)

    @classmethod
    def hydra(cls, r: int, heads: int, alpha: float | None = None) -> ExpertSpec:
        return cls("hydra", r, alpha, "identity", heads)

    @classmethod
    def parse(cls, text: str | ExpertSpec) -> ExpertSpec:
        """Parse "lora:8", "lora:8:16" (r:alpha), "adapter:16", "adapter:16:gelu",
        "hydra:8:8" (r:heads) or "hydra:8:8:16" (r:heads:alpha)."""
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
                return cls.lora(int(args[0]), float(args[1]) if len(args) == 2 else None)
            if kind == "adapter" and len(args) in (1, 2):
                return cls.adapter(int(args[0]), *(args[1:] and [args[1].lower()]))
            if kind == "hydra" and len(args) in (2, 3):
                alpha = float(args[2]) if len(args) == 3 else None
                return cls.hydra(int(args[0]), int(args[1]), alpha)
        except ValueError as error:
            raise ValueError(f"cannot parse expert {text!r}: {error}") from None
        raise ValueError(f"cannot parse expert {text!r}; expected one of {forms}")

    @property
    def num_experts(self) -> int:
        """How many gated experts this spec contributes (heads for hydra, else 1)."""
        return self.heads

    @property
    def scaling(self) -> float:
        if self.kind == "adapter":
            return 1.0
        return (self.alpha if self.alpha is not None else self.size) / self.size

    def __str__(self) -> str:
        if self.kind == "adapter":
            return f"adapter:{self.size}:{self.activation}"
        alpha = "" if self.alpha is None else f":{self.alpha:g}"
        if self.kind == "hydra":
            return f"hydra:{self.size}:{self.heads}{alpha}"
        return f"lora:{self.size}{alpha}"


def parse_experts(experts) -> list[ExpertSpec]:
    """A list of ExpertSpec or strings (or one comma-separated string) as ExpertSpecs."""
    if isinstance(experts, (str, ExpertSpec)):
        experts = [e for e in str(experts).split(",")] if isinstance(experts, str) else [experts]
    specs = [ExpertSpec.parse(e) for e in experts]
    if not specs:
        raise ValueError("a MoA layer needs at least one expert")
    return specs


@dataclass(frozen=True)
class RouterConfig:
    """How a router maps a token to expert gates.

    kind: "linear" (z = W x + b) or "swiglu" (z = W2 (silu(W1 x + b1) * (W3 x + b3)) + b2
        with hidden = hidden_factor * E).
    gate: "sigmoid" (paper default) or "softmax" over the experts, giving p.
    mode: "soft" (g = p), "threshold" (Sparse MoA: g = p * [p >= G],
        G = max_threshold * sigmoid(w_G . x + b_G)), "adaptive" (AdaMoLE: a = p - G,
        g = relu-like a / sum), "topk" (keep the top_k largest p, renormalise if
        normalize_topk).
    bias: whether the router's linear layers have biases (False for the bias-free routers of
        the MoLoRA and HydraLoRA baselines). The threshold layer always has a bias.
    """

    kind: str = "swiglu"
    hidden_factor: int = 4
    gate: str = "sigmoid"
    mode: str = "soft"
    max_threshold: float = 0.5
    top_k: int = 2
    normalize_topk: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        _check_choice("router kind", self.kind, ROUTER_KINDS)
        _check_choice("gate", self.gate, GATES)
        _check_choice("mode", self.mode, MODES)
        _check_positive_int("hidden_factor", self.hidden_factor)
        _check_positive_int("top_k", self.top_k)
        if not 0.0 < float(self.max_threshold) <= 1.0:
            raise ValueError(f"max_threshold must be in (0, 1], got {self.max_threshold!r}")

    @property
    def uses_threshold(self) -> bool:
        return self.mode in ("threshold", "adaptive")

    @property
    def is_sparse(self) -> bool:
        return self.mode != "soft"

    def check_num_experts(self, num_experts: int) -> None:
        if self.mode == "topk" and not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (the number of experts), "
                             f"got {self.top_k}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RouterConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown RouterConfig fields: {sorted(unknown)}")
        return cls(**data)


__all__ = ["ExpertSpec", "RouterConfig", "parse_experts"]
