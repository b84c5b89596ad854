"""Modules: the router and `MoALinear`, a drop-in replacement for a frozen nn.Linear.

A MoALinear keeps its experts stacked raggedly (see moa_kernels/layout.py):

    shrink_weight [R, in], shrink_bias [R_ad], expand_weight [out, C], expand_bias [N_ad, out]

and its optional router in `self.router` (a `MoARouter`). The math runs in one of three
backends with the same semantics: "reference" (per-expert loop, the oracle), "torch"
(fused PyTorch), "triton" (fused Triton kernels, CUDA or the Triton interpreter).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moa.config import BACKENDS, ExpertSpec, RouterConfig, parse_experts
from moa_kernels import reference, torch_ops
from moa_kernels.layout import ExpertLayout
from moa_kernels.routing import RouterOps, gates_from_first_layer

DEFAULT_ROUTER = RouterConfig()  # frozen, so one shared instance is safe


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run: an explicit choice wins, then MOA_BACKEND, then triton on CUDA
    (when importable), else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("MOA_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"unknown MOA_BACKEND {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def triton_available() -> bool:
    """True when the triton backend can be imported (triton installed)."""
    try:
        import moa_kernels.triton  # noqa: F401
    except ImportError:
        return False
    return True


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's, when autocast is on for x's device
    (autocast lowers float32 only; float64 stays float64)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64 \
            and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(x: torch.Tensor):
    """A context that switches autocast off for x's device (a no-op when it is off)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapter and router tensors stay float32 beside a half-precision base."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def check_triton_input(x: torch.Tensor) -> None:
    """Raise a clear error where the triton backend cannot run x."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' runs on CUDA tensors, or on the CPU under the "
                         f"Triton interpreter (TRITON_INTERPRET=1 set before triton is "
                         f"imported); got a {x.device.type} tensor. Use backend 'torch' or "
                         f"'auto' here")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"backend 'triton' supports float32, float16 and bfloat16 inputs, "
                         f"got {x.dtype}; use backend 'torch' for other dtypes")


def _new_parameter(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


class MoARouter(nn.Module):
    """Per-token gates g [..., E] over E experts (docs/DESIGN.md section 2).

    Parameters are named as `router_parameters()` reports them: weight, bias (linear) or
    w1_weight, w1_bias, w3_weight, w3_bias, w2_weight, w2_bias (swiglu); threshold_weight
    [1, in] and threshold_bias [1] in the threshold and adaptive modes. Biases start at zero,
    weights as nn.Linear's.
    """

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        config = RouterConfig() if config is None else config
        if not isinstance(config, RouterConfig):
            raise TypeError(f"router must be a RouterConfig or None, got {type(config).__name__}")
        config.check_num_experts(num_experts)
        self.config, self.in_features, self.num_experts = config, in_features, num_experts
        factory = {"device": device, "dtype": dtype}
        if config.kind == "linear":
            self._linear("weight", "bias", num_experts, in_features, config.bias, factory)
        else:
            hidden = config.hidden_factor * num_experts
            self._linear("w1_weight", "w1_bias", hidden, in_features, config.bias, factory)
            self._linear("w3_weight", "w3_bias", hidden, in_features, config.bias, factory)
            self._linear("w2_weight", "w2_bias", num_experts, hidden, config.bias, factory)
        if config.uses_threshold:
            self._linear("threshold_weight", "threshold_bias", 1, in_features, True, factory)

    def _linear(self, weight_name, bias_name, rows, columns, bias, factory) -> None:
        weight = _new_parameter((rows, columns), **factory)
        if weight.device.type != "meta":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.register_parameter(weight_name, weight)
        self.register_parameter(bias_name, nn.Parameter(torch.zeros(rows, **factory))
                                if bias else None)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The live parameters by name (None for an absent bias)."""
        names = ["weight", "bias"] if self.config.kind == "linear" else \
            ["w1_weight", "w1_bias", "w3_weight", "w3_bias", "w2_weight", "w2_bias"]
        if self.config.uses_threshold:
            names += ["threshold_weight", "threshold_bias"]
        return {name: getattr(self, name) for name in names}

    def ops(self, dtype: torch.dtype) -> RouterOps:
        """First layer (to fuse into a shrink GEMM) and finisher, in `dtype`."""
        config = self.config
        if config.kind == "linear":
            weights, biases = [self.weight], [self.bias]
        else:
            weights, biases = [self.w1_weight, self.w3_weight], [self.w1_bias, self.w3_bias]
        if config.uses_threshold:
            # In threshold mode G only enters through a comparison, so it gets no gradient;
            # detaching keeps its .grad None exactly as in the reference.
            detach = config.mode == "threshold"
            weights.append(self.threshold_weight.detach() if detach else self.threshold_weight)
            biases.append(self.threshold_bias.detach() if detach else self.threshold_bias)
        first_weight = torch.cat(weights).to(dtype)
        first_bias = None
        if any(b is not None for b in biases):
            first_bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0])
                                    for w, b in zip(weights, biases)]).to(dtype)
        w2_weight = getattr(self, "w2_weight", None)
        w2_bias = getattr(self, "w2_bias", None)

        def finish(first_layer: torch.Tensor):
            # The head is tiny ([T, F]): run it in at least fp32 (fp64 stays fp64).
            head_dtype = torch.promote_types(first_layer.dtype, torch.float32)
            return gates_from_first_layer(
                first_layer.to(head_dtype), kind=config.kind, gate=config.gate,
                mode=config.mode, num_experts=self.num_experts,
                w2_weight=None if w2_weight is None else w2_weight.to(head_dtype),
                w2_bias=None if w2_bias is None else w2_bias.to(head_dtype),
                max_threshold=config.max_threshold, top_k=config.top_k,
                normalize_topk=config.normalize_topk)

        return RouterOps(first_weight, first_bias, finish)

    def reference_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Gates by the reference router, in x's dtype."""
        params = {k: None if v is None else v.to(x.dtype) for k, v in self.tensors().items()}
        c = self.config
        return reference.reference_router(
            x, params, kind=c.kind, gate=c.gate, mode=c.mode, max_threshold=c.max_threshold,
            top_k=c.top_k, normalize_topk=c.normalize_topk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applied gates g [..., E] for x [..., in] (fused: one matmul for the first layer)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"router input has last dimension {x.shape[-1]}, "
                             f"expected in_features={self.in_features}")
        dtype = compute_dtype(x)
        ops = self.ops(dtype)
        with autocast_off(x):
            flat = x.reshape(-1, self.in_features).to(dtype)
            gates, _ = ops.finish(F.linear(flat, ops.first_weight, ops.first_bias))
        return gates.to(dtype).reshape(*x.shape[:-1], self.num_experts)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, experts={self.num_experts}, kind={c.kind}, "
                f"gate={c.gate}, mode={c.mode}")


class MoALinear(nn.Module):
    """y = base(x) + sum_e g_e(x) * delta_e(dropout(x)), base frozen.

    Args:
        base: the frozen nn.Linear to adapt (its parameters are set requires_grad=False).
        experts: ExpertSpecs or strings such as "lora:8", "adapter:16:gelu", "hydra:8:8".
        router: a RouterConfig (default: SwiGLU x4, sigmoid, soft: the paper's router), or
            None to drive the layer with `gates` (a shared router).
        dropout: dropout probability on the experts' input (not the router, not base).
        backend: "auto", "reference", "torch" or "triton" (see `resolve_backend`).
        adapter_dtype: dtype of the adapter and router tensors; default float32 for a
            half-precision base, else the base dtype.
    """

    def __init__(self, base: nn.Linear, experts: Sequence[ExpertSpec | str] | str,
                 router: RouterConfig | None = DEFAULT_ROUTER, dropout: float = 0.0,
                 backend: str = "auto", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MoALinear adapts an nn.Linear, got {type(base).__name__}")
        if type(base).forward is not nn.Linear.forward:
            raise TypeError(f"MoALinear computes base(x) from base.weight and base.bias, but "
                            f"{type(base).__name__} overrides nn.Linear.forward (quantized "
                            "or otherwise customised layers are not supported); pass a plain "
                            "nn.Linear")
        if base._forward_hooks or base._forward_pre_hooks:
            raise ValueError("the base nn.Linear has forward hooks, which MoALinear would "
                             "bypass (it computes base(x) from the weights); remove them first")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.specs = parse_experts(experts)
        self.layout = ExpertLayout.from_specs(self.specs, self.in_features, self.out_features)
        self.num_experts = self.layout.num_experts
        self.backend = backend
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        if adapter_dtype is None:
            adapter_dtype = default_adapter_dtype(base.weight.dtype)
        factory = {"device": device, "dtype": adapter_dtype}
        layout = self.layout
        self.shrink_weight = _new_parameter((layout.shrink_rows, self.in_features), **factory)
        self.expand_weight = _new_parameter((self.out_features, layout.expand_columns),
                                            **factory)
        bias_rows = layout.shrink_rows - layout.bias_start
        self.shrink_bias = nn.Parameter(torch.zeros(bias_rows, **factory)) if bias_rows \
            else None
        self.expand_bias = nn.Parameter(torch.zeros(layout.num_adapters, self.out_features,
                                                    **factory)) if layout.num_adapters else None
        self.router = None
        if router is not None:
            self.router = MoARouter(self.in_features, self.num_experts, router, **factory)
        self.last_gates: torch.Tensor | None = None
        if device.type != "meta":
            self.reset_expert_parameters()

    # ---- parameters ----------------------------------------------------------------------

    @torch.no_grad()
    def reset_expert_parameters(self) -> None:
        """docs/DESIGN.md init: lora A kaiming-uniform (a=sqrt(5)), B zero; adapter weights
        xavier-uniform with gain 1e-4, biases zero."""
        initialised = set()
        for slot, params in zip(self.layout.slots, self._expert_tensors(detach=True)):
            if slot.kind == "adapter":
                nn.init.xavier_uniform_(params["down_weight"], gain=1e-4)
                nn.init.xavier_uniform_(params["up_weight"], gain=1e-4)
                params["down_bias"].zero_()
                params["up_bias"].zero_()
                continue
            if slot.shrink not in initialised:
                nn.init.kaiming_uniform_(params["lora_A"], a=math.sqrt(5))
                initialised.add(slot.shrink)
            params["lora_B"].zero_()

    def _stacked(self, dtype: torch.dtype | None = None):
        """(shrink_weight, shrink_bias, expand_weight, expand_bias), empty tensors for the
        absent biases, cast to dtype."""
        tensors = (self.shrink_weight,
                   self.shrink_bias if self.shrink_bias is not None else self._empty_bias(0),
                   self.expand_weight,
                   self.expand_bias if self.expand_bias is not None
                   else self._empty_bias(0, self.out_features))
        if dtype is None or dtype == self.shrink_weight.dtype:
            return tensors
        return tuple(t.to(dtype) for t in tensors)

    def _empty_bias(self, *shape: int) -> torch.Tensor:
        """A cached empty tensor standing in for an absent bias."""
        weight = self.shrink_weight
        key = (shape, weight.device, weight.dtype)
        cache = self.__dict__.setdefault("_empty_biases", {})
        if key not in cache:
            cache[key] = weight.new_zeros(shape)
        return cache[key]

    def _expert_tensors(self, detach: bool, dtype: torch.dtype | None = None):
        shrink_weight, shrink_bias, expand_weight, expand_bias = self._stacked(dtype)
        if detach:
            shrink_weight, shrink_bias, expand_weight, expand_bias = (
                t.detach() for t in (shrink_weight, shrink_bias, expand_weight, expand_bias))
        result = []
        for slot in self.layout.slots:
            rows, columns = slice(*slot.shrink), slice(*slot.expand)
            if slot.kind == "adapter":
                bias_rows = slice(slot.shrink[0] - self.layout.bias_start,
                                  slot.shrink[1] - self.layout.bias_start)
                result.append({"down_weight": shrink_weight[rows],
                               "down_bias": shrink_bias[bias_rows],
                               "up_weight": expand_weight[:, columns],
                               "up_bias": expand_bias[slot.adapter_index]})
            else:
                result.append({"lora_A": shrink_weight[rows],
                               "lora_B": expand_weight[:, columns]})
        return result

    def expert_parameters(self) -> list[dict[str, torch.Tensor]]:
        """Per expert, live views of its tensors (writing into them changes the layer):
        lora/hydra {"lora_A" [r, in], "lora_B" [out, r]} (hydra heads share lora_A);
        adapter {"down_weight" [size, in], "down_bias" [size], "up_weight" [out, size],
        "up_bias" [out]}. The views are detached from autograd."""
        return self._expert_tensors(detach=True)

    def router_parameters(self) -> dict[str, torch.Tensor]:
        """Live, detached views of the router's tensors by name (absent biases left out)."""
        if self.router is None:
            raise ValueError("this MoALinear has no router (router=None); its gates come "
                             "from outside")
        return {k: v.detach() for k, v in self.router.tensors().items() if v is not None}

    # ---- forward -------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The applied gates g [..., E] this layer's router gives x [..., in]."""
        if self.router is None:
            raise ValueError("this MoALinear has no router (router=None); pass gates to "
                             "forward instead")
        self._check_input(x)
        if resolve_backend(self.backend, x.device) == "reference":
            dtype = compute_dtype(x)
            with autocast_off(x):
                return self.router.reference_gates(x.to(dtype))
        return self.router(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoALinear expects a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"MoALinear expects a floating-point input, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {tuple(x.shape)}; its last dimension must be "
                             f"in_features={self.in_features}")

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None = None, *,
                sparse: bool | None = None) -> torch.Tensor:
        """y [..., out] for x [..., in]; gates [..., E] (already masked) replace the router's.

        sparse: skip the (token, expert) pairs whose gate is zero (outside gates from a
        sparse-mode shared router): a skipped pair adds nothing and its gate gets no
        gradient, on every backend. Default: the layer's own router mode; dense for
        outside gates.

        Differentiable once: the fused backends refuse a second derivative (create_graph)
        with an error; the reference backend supports it.
        """
        self._check_input(x)
        leading = x.shape[:-1]
        if gates is None and self.router is None:
            raise ValueError("this MoALinear has no router (router=None): forward needs "
                             f"gates of shape {(*leading, self.num_experts)}")
        if gates is not None and tuple(gates.shape) != (*leading, self.num_experts):
            raise ValueError(f"gates have shape {tuple(gates.shape)}, expected "
                             f"{(*leading, self.num_experts)} (input leading dims + experts)")
        dtype = compute_dtype(x)
        backend = resolve_backend(self.backend, x.device)
        with autocast_off(x):
            flat = x.reshape(-1, self.in_features).to(dtype)
            flat_gates = None if gates is None else gates.reshape(-1, self.num_experts)
            adapter_input = self.dropout(flat) if self.training and \
                isinstance(self.dropout, nn.Dropout) else None
            if backend == "reference":
                if sparse and flat_gates is not None:
                    flat_gates = flat_gates * (flat_gates != 0)
                y, used_gates = self._forward_reference(flat, flat_gates, adapter_input)
            else:
                y, used_gates = self._forward_fused(backend, flat, flat_gates, adapter_input,
                                                    sparse)
        self.last_gates = used_gates.detach().reshape(*leading, self.num_experts)
        return y.reshape(*leading, self.out_features)

    def _base_tensors(self, dtype):
        weight, bias = self.base.weight, self.base.bias
        if weight.dtype == dtype:
            return weight, bias
        return weight.to(dtype), None if bias is None else bias.to(dtype)

    def _forward_reference(self, x, gates, adapter_input):
        if gates is None:
            gates = self.router.reference_gates(x)
        experts = [(slot.kind, slot.scaling, slot.activation, params) for slot, params in
                   zip(self.layout.slots, self._expert_tensors(detach=False, dtype=x.dtype))]
        y = reference.reference_moa_linear(x, *self._base_tensors(x.dtype), experts,
                                           gates.to(x.dtype), adapter_input)
        return y, gates.to(x.dtype)

    def _forward_fused(self, backend, x, gates, adapter_input, sparse):
        if backend == "triton":
            check_triton_input(x)
            from moa_kernels import triton as ops
        else:
            ops = torch_ops
        shrink_weight, shrink_bias, expand_weight, expand_bias = self._stacked(x.dtype)
        base_weight, base_bias = self._base_tensors(x.dtype)
        router = None if gates is not None or self.router is None else self.router.ops(x.dtype)
        if sparse is None:
            sparse = gates is None and self.router is not None and \
                self.router.config.is_sparse
        return ops.moa_linear(
            x, base_weight=base_weight, base_bias=base_bias, layout=self.layout,
            shrink_weight=shrink_weight, shrink_bias=shrink_bias, expand_weight=expand_weight,
            expand_bias=expand_bias, router=router, gates=gates, adapter_input=adapter_input,
            sparse=sparse)

    def extra_repr(self) -> str:
        experts = ", ".join(str(s) for s in self.specs)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"experts=[{experts}], backend={self.backend}")
