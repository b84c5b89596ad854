"""Modules: the router and `MoALinear`, a drop-in replacement for a frozen nn.Linear.

A MoALinear keeps its experts stacked raggedly (see moa_kernels/layout.py):

    shrink_weight [R, in], shrink_bias [R_ad], expand_weight [out, C], expand_bias [N_ad, out]

and its optional router in `self.router` (a `MoARouter`). The base is any frozen module
mapping [..., in] to [..., out] linearly: a plain nn.Linear (whose GEMM the backends may
fuse with the experts' shrink GEMM), or anything else (bitsandbytes 4/8-bit layers, torchao
quantized weights, hooked or FSDP-managed layers), which is called as a module, `base(x)`,
so its quantization, hooks and unsharding run as their authors meant. The math runs in one
of three backends with one contract (moa_kernels/backends.py): "reference" (per-expert
loop, the oracle), "torch" (fused PyTorch), "triton" (fused Triton kernels, CUDA or the
Triton interpreter).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from moa.config import BACKENDS, ExpertSpec, RouterConfig, parse_experts
from moa_kernels import reference, torch_ops
from moa_kernels.backends import check_triton_input, get_backend
from moa_kernels.layout import ExpertLayout
from moa_kernels.routing import RouterOps, gates_from_first_layer

DEFAULT_ROUTER = RouterConfig()  # frozen, so one shared instance is safe


# auto picks triton on CUDA only once benchmarks/gpu_suite.sh has passed on real hardware
# with its figures in benchmarks/RESULTS.md; until then the triton backend has never run on
# a GPU (only the interpreter and sm_90 builds have checked it), so auto takes torch.
TRITON_AUTO_ON_CUDA = False


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run: an explicit choice wins, then MOA_BACKEND, then auto: torch
    (triton on CUDA once TRITON_AUTO_ON_CUDA is set, see there)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("MOA_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"unknown MOA_BACKEND {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if TRITON_AUTO_ON_CUDA and device.type == "cuda" \
            and triton_available() else "torch"
    return backend


# The backends' modules, imported once: torch.compile traces an attribute lookup on them
# (get_backend's importlib call would break the graph). Triton is imported on first use,
# after its input check (triton picks compiled or interpreted kernels at import).
_BACKEND_MODULES = {"reference": reference, "torch": torch_ops}


def backend_function(name: str, x: torch.Tensor) -> Callable:
    """The `moa_linear` entry point of backend `name` (resolved) for the input x."""
    if name == "triton":
        check_triton_input(x)
        import moa_kernels.triton as triton_backend  # an import statement compiles

        return triton_backend.moa_linear
    module = _BACKEND_MODULES.get(name)
    return get_backend(name) if module is None else module.moa_linear


def generate_cached(module: nn.Module, key, make: Callable):
    """make(), kept under `key` in module.generate_cache while that cache is on and grad mode
    is off (prompt_key_cache in moa/experts.py turns it on for one MoAModel.generate): what
    is derived from the weights (casts, concatenations) is fixed over a generate call, so
    decoding computes it once, not once per token. Under torch.compile a cached value is read
    (a graph input) but none is written (no side effect inside the graph)."""
    cache = getattr(module, "generate_cache", None)
    if cache is None or torch.is_grad_enabled():
        return make()
    value = cache.get(key)
    if value is None:
        value = make()
        if not torch.compiler.is_compiling():
            cache[key] = value
    return value


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
    """Adapter and router tensors stay float32 beside a half-precision (or non-float) base."""
    if not base_dtype.is_floating_point or base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


ORDINARY_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def is_plain_linear(base: nn.Module) -> bool:
    """True for an nn.Linear whose forward is nn.Linear's, with no forward hooks and
    ordinary (not quantized, not sharded) tensors: its output is exactly
    F.linear(x, weight, bias), so the backends may compute it in their own GEMM."""
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return False
    if base._forward_hooks or base._forward_pre_hooks:
        return False
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    return type(base.weight) in ORDINARY_TENSOR_TYPES and \
        (base.bias is None or type(base.bias) in ORDINARY_TENSOR_TYPES)


def base_compute_dtype(base: nn.Module) -> torch.dtype | None:
    """The floating dtype the base computes in, where it says: bitsandbytes' 4-bit
    `compute_dtype`, else a floating weight's dtype (torchao's quantized tensors report the
    original one); None when it cannot be told (bitsandbytes int8)."""
    compute = getattr(base, "compute_dtype", None)
    if isinstance(compute, torch.dtype) and compute.is_floating_point:
        return compute
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point and \
            not getattr(weight, "bnb_quantized", False):
        return weight.dtype
    return None


def _base_features(base: nn.Module) -> tuple[int, int]:
    in_features = getattr(base, "in_features", None)
    out_features = getattr(base, "out_features", None)
    if not all(isinstance(v, int) and not isinstance(v, bool)
               for v in (in_features, out_features)):
        raise TypeError(f"MoALinear adapts a frozen module that maps [..., in_features] to "
                        f"[..., out_features] linearly and says so through integer "
                        f"`in_features` and `out_features` attributes (nn.Linear and its "
                        f"subclasses: bitsandbytes Linear4bit and Linear8bitLt, torchao "
                        f"quantized linears); got a {type(base).__name__}")
    if in_features < 1 or out_features < 1:
        raise ValueError(f"the base {type(base).__name__} has in_features={in_features} and "
                         f"out_features={out_features}; both must be >= 1")
    return in_features, out_features


def _base_device(base: nn.Module) -> torch.device:
    for tensor in itertools.chain(base.parameters(), base.buffers()):
        return tensor.device
    return torch.device("cpu")


def _new_parameter(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


def threshold_straight_through(gates: torch.Tensor, threshold_logit: torch.Tensor,
                               max_threshold: float) -> torch.Tensor:
    """Sparse MoA gates g = p * [p >= G] with a straight-through gradient for G.

    Args:
        gates: [T, E] the applied gates p * m; threshold_logit: [T, 1] w_G . x + b_G.
    Returns:
        [T, E] equal to `gates` in value (G - G is exactly 0), with d g_e / d G = -g_e: on a
        pair that runs, raising the threshold acts as lowering its gate by p_e; a skipped
        pair (g_e = 0) adds nothing, so every backend (the sparse ones never compute a
        skipped expert's output) gives the reference's gradient. d g / d p is unchanged.
    """
    threshold = max_threshold * torch.sigmoid(threshold_logit)
    return gates * (1 + (threshold.detach() - threshold))


class MoARouter(nn.Module):
    """Per-token gates g [..., E] over E experts (docs/DESIGN.md section 2).

    Parameters are named as `router_parameters()` reports them: weight, bias (linear) or
    w1_weight, w1_bias, w3_weight, w3_bias, w2_weight, w2_bias (swiglu); threshold_weight
    [1, in] and threshold_bias [1] in the threshold and adaptive modes. Biases start at zero,
    weights as nn.Linear's. In mode "threshold" the threshold tensors are frozen
    (requires_grad False: the published method never updates them) unless
    config.learn_threshold, which trains them through `threshold_straight_through`.
    """

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        config = RouterConfig() if config is None else config
        if not isinstance(config, RouterConfig):
            raise TypeError(f"router must be a RouterConfig or None, got {type(config).__name__}")
        config.check_num_experts(num_experts)
        if config.kind == "group":
            raise ValueError("a 'group' router gates the adapter groups of a decoder layer "
                             "(MoAConfig with router_scope 'layer' or 'instance'); a "
                             "MoALinear's own router is 'linear' or 'swiglu'")
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
            if config.mode == "threshold" and not config.learn_threshold:
                self.threshold_weight.requires_grad_(False)
                self.threshold_bias.requires_grad_(False)

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
        """First layer (its blocks, to fuse into a shrink GEMM) and finisher, in `dtype`."""
        config = self.config
        if config.kind == "linear":
            weights, biases = [self.weight], [self.bias]
        else:
            weights, biases = [self.w1_weight, self.w3_weight], [self.w1_bias, self.w3_bias]
        if config.uses_threshold:
            # In threshold mode G only enters through a comparison, so it gets no gradient;
            # detaching keeps its .grad None exactly as in the reference.
            detach = config.mode == "threshold" and not config.learn_threshold
            weights.append(self.threshold_weight.detach() if detach else self.threshold_weight)
            biases.append(self.threshold_bias.detach() if detach else self.threshold_bias)
        w2_weight = getattr(self, "w2_weight", None)
        w2_bias = getattr(self, "w2_bias", None)

        def finish(first_layer):
            """first_layer: [T, F], or its blocks (one per weight block) apart."""
            blocks = [first_layer] if isinstance(first_layer, torch.Tensor) else \
                list(first_layer)
            # The head is tiny ([T, F]): run it in at least fp32 (fp64 stays fp64).
            head_dtype = torch.float64 if blocks[0].dtype == torch.float64 else torch.float32
            blocks = [block.to(head_dtype) for block in blocks]
            gates, active = gates_from_first_layer(
                blocks[0] if isinstance(first_layer, torch.Tensor) else blocks,
                kind=config.kind, gate=config.gate,
                mode=config.mode, num_experts=self.num_experts,
                w2_weight=None if w2_weight is None else w2_weight.to(head_dtype),
                w2_bias=None if w2_bias is None else w2_bias.to(head_dtype),
                max_threshold=config.max_threshold, top_k=config.top_k,
                normalize_topk=config.normalize_topk)
            if config.learn_threshold:  # the threshold logit is the last column
                gates = threshold_straight_through(gates, blocks[-1][:, -1:],
                                                   config.max_threshold)
            return gates, active

        return RouterOps(weights, biases, finish, self.reference_gates, dtype)

    def reference_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Gates by the reference router, in x's dtype."""
        params = {k: None if v is None else v.to(x.dtype) for k, v in self.tensors().items()}
        c = self.config
        gates = reference.reference_router(
            x, params, kind=c.kind, gate=c.gate, mode=c.mode, max_threshold=c.max_threshold,
            top_k=c.top_k, normalize_topk=c.normalize_topk)
        if c.learn_threshold:
            gates = threshold_straight_through(
                gates, F.linear(x, params["threshold_weight"], params["threshold_bias"]),
                c.max_threshold)
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applied gates g [..., E] for x [..., in] (fused: one matmul for the first layer)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"router input has last dimension {x.shape[-1]}, "
                             f"expected in_features={self.in_features}")
        dtype = compute_dtype(x)
        ops = generate_cached(self, ("ops", dtype), lambda: self.ops(dtype))
        with autocast_off(x):
            flat = x.reshape(-1, self.in_features).to(dtype)
            if getattr(self, "generate_cache", None) is not None and \
                    not torch.is_grad_enabled():  # inside generate: stacked once per call
                first = F.linear(flat, ops.first_weight, ops.first_bias)
            else:  # one GEMM over the blocks, stacked once per call inside the op
                first = torch_ops.stacked_linear(flat, ops.weight_parts, [
                    b if b is not None else w.shape[0]
                    for w, b in zip(ops.weight_parts, ops.bias_parts)],
                    [w.shape[0] for w in ops.weight_parts])
            gates, _ = ops.finish(first)
        return gates.to(dtype).reshape(*x.shape[:-1], self.num_experts)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, experts={self.num_experts}, kind={c.kind}, "
                f"gate={c.gate}, mode={c.mode}")


class MoALinear(nn.Module):
    """y = base(x) + sum_e g_e(x) * delta_e(dropout(x)), base frozen.

    Args:
        base: the frozen module to adapt (its parameters are set requires_grad=False): any
            module mapping [..., in_features] to [..., out_features] linearly, with integer
            `in_features` and `out_features` attributes: nn.Linear, bitsandbytes Linear4bit
            and Linear8bitLt, torchao quantized linears, hooked or FSDP-managed linears.
            A plain, unhooked nn.Linear with ordinary tensors is computed by the backends
            (its GEMM shares x with the experts' shrink GEMM); every other base is called as
            a module and the backends add the mixture to its output.
        experts: ExpertSpecs or strings such as "lora:8", "adapter:16:gelu", "hydra:8:8".
        router: a RouterConfig (default: SwiGLU x4, sigmoid, soft: the paper's router), or
            None to drive the layer with `gates` (a shared router).
        dropout: dropout probability on the experts' input (not the router, not base).
        backend: "auto", "reference", "torch" or "triton" (see `resolve_backend`).
        adapter_dtype: dtype of the adapter and router tensors: a floating torch.dtype;
            "base" for the base's compute dtype (bitsandbytes' compute_dtype, or a float
            weight's dtype); None (default) for float32 beside a half-precision or quantized
            base, else the base weight's dtype.

    Input dtype: the layer computes in x's dtype (autocast's when autocast is on). A plain
    nn.Linear base, like nn.Linear itself, refuses an input whose dtype differs from its
    weight's outside autocast; other bases handle their input as they do alone. The output
    has the base output's dtype.

    `active` (default True) switches the experts off: the layer then returns base(x) alone,
    without swapping modules (MoAModel.disable_adapters sets it).
    """

    def __init__(self, base: nn.Module, experts: Sequence[ExpertSpec | str] | str,
                 router: RouterConfig | None = DEFAULT_ROUTER, dropout: float = 0.0,
                 backend: str = "auto",
                 adapter_dtype: torch.dtype | str | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"MoALinear adapts a frozen nn.Module, got {type(base).__name__}")
        if isinstance(base, MoALinear):
            raise TypeError("the base is already a MoALinear; adapt its .base instead")
        if hasattr(base, "base_layer") and hasattr(base, "lora_A"):
            raise TypeError(f"the base {type(base).__name__} is a PEFT LoRA layer; adapt the "
                            "model before PEFT wraps it (or its base_layer)")
        self.in_features, self.out_features = _base_features(base)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
                not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.specs = parse_experts(experts)
        self.layout = ExpertLayout.from_specs(self.specs, self.in_features, self.out_features)
        self.num_experts = self.layout.num_experts
        self.backend = backend
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = True
        device = _base_device(base)
        factory = {"device": device, "dtype": self._adapter_dtype(adapter_dtype)}
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
        self.register_buffer("expert_signature", expert_signature(self.specs, device))
        self._register_load_state_dict_pre_hook(self._check_signature_on_load)
        # The gates of the last forward (see last_gates): a tensor, or None; while
        # _gates_from_source, the gate source's instead (written only when it changes, so a
        # decoding step stores nothing per layer call).
        self._last_gates: torch.Tensor | None = None
        self._gates_from_source = False
        # (x, InputRecipe) set by a hook right before a call on that very x (the prompt
        # expert on o_proj); consumed by that call.
        self.next_input_recipe: tuple[torch.Tensor, torch_ops.InputRecipe] | None = None
        # Where a router-less layer takes its gates when forward is given none: a callable
        # x -> (gates, sparse, x's shrink output computed outside or None), or None while it
        # has no gates, whose last_gates() are the gates it last handed out
        # (moa.experts.LayerGates: its slice of a layer router's gates). A plain attribute,
        # not a hook, so a call of the layer runs no hook machinery.
        self.gate_source: Callable[[torch.Tensor], tuple | None] | None = None
        if device.type != "meta":
            self.reset_expert_parameters()
        self._place_index_tensors()

    def _apply(self, fn, recurse: bool = True):
        """nn.Module._apply (.to, .cuda, .half, to_empty, ...), then the layout's index
        tensors made on the device the layer's tensors moved to (`_place_index_tensors`)."""
        module = super()._apply(fn, recurse)
        self._place_index_tensors()
        return module

    def _place_index_tensors(self) -> None:
        """The layout's index tensors (ExpertLayout.index_tensors) on the device of this
        layer's tensors, made here, at construction and after every move, outside any
        graph: a model compiled straight away on that device (no eager call first) then
        reads them as graph inputs instead of copying the CPU ones inside the graph at
        every step."""
        device = self.shrink_weight.device
        if device.type != "meta":
            self.layout.index_tensors(device)

    def _adapter_dtype(self, adapter_dtype: torch.dtype | str | None) -> torch.dtype:
        compute = base_compute_dtype(self.base)
        if adapter_dtype is None:
            return default_adapter_dtype(compute if compute is not None else torch.float32)
        if adapter_dtype == "base":
            if compute is None:
                raise ValueError(f"adapter_dtype='base': the {type(self.base).__name__} base "
                                 "does not say what dtype it computes in; pass a floating "
                                 "torch.dtype (e.g. torch.bfloat16)")
            return compute
        if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
            raise ValueError(f"adapter_dtype must be a floating torch.dtype, 'base' or None, "
                             f"got {adapter_dtype!r}")
        return adapter_dtype

    def _check_signature_on_load(self, state_dict, prefix, *args) -> None:
        """load_state_dict pre-hook: the incoming experts must be these experts (same
        kinds, sizes, order and scalings), not only tensors of the same shapes."""
        key = prefix + "expert_signature"
        expected = expert_signature(self.specs, torch.device("cpu"))
        if key not in state_dict:  # saved before signatures existed
            state_dict[key] = expected
            return
        incoming = state_dict[key]
        if tuple(incoming.shape) != tuple(expected.shape) or \
                not torch.equal(incoming.detach().cpu().to(torch.int64), expected):
            raise ValueError(f"{prefix or 'MoALinear'}: the state_dict holds other experts "
                             f"({describe_signature(incoming)}) than this layer "
                             f"([{', '.join(str(s) for s in self.specs)}]); build the layer "
                             "with the experts it was saved with")

    # ---- parameters ----------------------------------------------------------------------

    @torch.no_grad()
    def reset_expert_parameters(self) -> None:
        """docs/DESIGN.md init: lora A kaiming-uniform (a=sqrt(5)), B zero; adapter weights
        xavier-uniform with gain 1e-4, biases zero."""
        initialised = set()
        for slot, params in zip(self.layout.slots, self.expert_parameters()):
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
        shrink_weight, shrink_bias = self.shrink_weight, self.shrink_bias
        expand_weight, expand_bias = self.expand_weight, self.expand_bias
        if shrink_bias is None or expand_bias is None:
            empty_shrink, empty_expand = self._empty_biases()
            shrink_bias = empty_shrink if shrink_bias is None else shrink_bias
            expand_bias = empty_expand if expand_bias is None else expand_bias
        tensors = (shrink_weight, shrink_bias, expand_weight, expand_bias)
        if dtype is None or dtype == shrink_weight.dtype:
            return tensors
        return tuple(t.to(dtype) for t in tensors)

    def _empty_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached empty tensors [0] and [0, out] standing in for absent biases (made in the
        graph under torch.compile: a cache lookup would be guarded on at every call)."""
        weight = self.shrink_weight
        if torch.compiler.is_compiling():
            return weight.new_zeros(0), weight.new_zeros(0, self.out_features)
        key = (weight.device, weight.dtype)
        cache = self.__dict__.setdefault("_empty_bias_cache", {})
        empties = cache.get(key)
        if empties is None:
            empties = cache[key] = (weight.new_zeros(0), weight.new_zeros(0, self.out_features))
        return empties

    def expert_parameters(self) -> list[dict[str, torch.Tensor]]:
        """Per expert, live views of its tensors (writing into them changes the layer):
        lora/hydra {"lora_A" [r, in], "lora_B" [out, r]} (hydra heads share lora_A);
        adapter {"down_weight" [size, in], "down_bias" [size], "up_weight" [out, size],
        "up_bias" [out]}. The views are detached from autograd."""
        return self.layout.expert_tensors(*(t.detach() for t in self._stacked()))

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
        if x.device.type == "meta":
            raise ValueError("MoALinear cannot run on meta tensors (they hold no values); "
                             "materialise the model first (e.g. to_empty(), then load its "
                             "weights)")

    def _check_gates(self, gates, x: torch.Tensor) -> None:
        expected = (*x.shape[:-1], self.num_experts)
        if not isinstance(gates, torch.Tensor):
            raise TypeError(f"gates must be a tensor of shape {expected}, got "
                            f"{type(gates).__name__}")
        if not gates.is_floating_point():
            raise TypeError(f"gates must be a floating-point tensor, got {gates.dtype}")
        if tuple(gates.shape) != expected:
            raise ValueError(f"gates have shape {tuple(gates.shape)}, expected {expected} "
                             "(input leading dims + experts)")
        if gates.device != x.device:
            raise ValueError(f"gates are on {gates.device}, the input on {x.device}; put "
                             "them on the same device")

    @property
    def last_gates(self) -> torch.Tensor | None:
        """The gates [..., E] applied in the last forward (detached), None before the first
        or with the layer switched off. Gates taken from the gate source (a layer router's
        slice) are read from it: per token, or [B, 1, E] for instance routing."""
        if self._gates_from_source and self.gate_source is not None:
            return self.gate_source.last_gates()
        return self._last_gates

    @last_gates.setter
    def last_gates(self, gates: torch.Tensor | None) -> None:
        self._last_gates, self._gates_from_source = gates, False

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
        pending = self.next_input_recipe
        if pending is not None:
            self.next_input_recipe = None
        if not self.active:
            self.last_gates = None
            return self.base(x)
        leading = x.shape[:-1]
        from_source, shrink_output = False, None
        if gates is None and self.gate_source is not None:
            shared = self.gate_source(x)
            if shared is not None:
                gates, shared_sparse, shrink_output = shared
                sparse = shared_sparse if sparse is None else sparse
                from_source = True
        if gates is None and self.router is None:
            raise ValueError("this MoALinear has no router (router=None): forward needs "
                             f"gates of shape {(*leading, self.num_experts)}")
        if gates is not None and not from_source:  # a gate source checks its own
            self._check_gates(gates, x)
        base = self.base  # (each nn.Module attribute read is a Python call: read once)
        plain = is_plain_linear(base)
        base_weight, base_bias = (base.weight, base.bias) if plain else (None, None)
        dtype = compute_dtype(x)
        if plain and x.dtype != base_weight.dtype and \
                not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"input dtype {x.dtype} differs from the base weight's "
                            f"{base_weight.dtype} (nn.Linear refuses this too); cast the "
                            "input, or run under torch.autocast")
        base_output = None if plain else base(x)
        with autocast_off(x):
            flat = x.reshape(-1, self.in_features).to(dtype)
            flat_gates = None if gates is None else gates.reshape(-1, self.num_experts)
            adapter_input = self.dropout(flat) if self.training and \
                isinstance(self.dropout, nn.Dropout) else None
            if sparse is None:
                sparse = gates is None and self.router.config.is_sparse
            backend = resolve_backend(self.backend, x.device)
            torch_only = {}  # what only the torch backend takes
            if pending is not None and pending[0] is x and backend == "torch" and plain and \
                    flat.dtype == x.dtype and adapter_input is None:
                torch_only["input_recipe"] = pending[1]
            if shrink_output is not None and backend == "torch" and plain and \
                    adapter_input is None and not sparse and shrink_output.dtype == dtype:
                torch_only["shrink_output"] = shrink_output
            # Casts are kept over a generate call; tensors already in dtype are used as they
            # are (nothing to cache: under torch.compile no cache lookup to guard on). The
            # triton backend takes the parameters themselves: its ops cast while packing,
            # and the packed weights are cached per version of the parameters (a cast made
            # here would be a new tensor at every call, and miss that cache).
            stacked = self._stacked()
            if stacked[0].dtype != dtype and backend != "triton":
                stacked = generate_cached(self, ("stacked", dtype), lambda: self._stacked(dtype))
            shrink_weight, shrink_bias, expand_weight, expand_bias = stacked
            if plain and base_weight.dtype == dtype and \
                    (base_bias is None or base_bias.dtype == dtype):
                base_kwargs = {"base_weight": base_weight, "base_bias": base_bias}
            elif plain:
                base_kwargs = generate_cached(self, ("base", dtype), lambda: {
                    "base_weight": base_weight.to(dtype),
                    "base_bias": None if base_bias is None else base_bias.to(dtype)})
            else:
                base_kwargs = {"base_output": base_output.reshape(-1, self.out_features)
                               .to(dtype)}
            y, used_gates = backend_function(backend, x)(
                flat, **base_kwargs, layout=self.layout, shrink_weight=shrink_weight,
                shrink_bias=shrink_bias, expand_weight=expand_weight, expand_bias=expand_bias,
                router=None if flat_gates is not None else generate_cached(
                    self.router, ("ops", dtype), lambda: self.router.ops(dtype)),
                gates=flat_gates, adapter_input=adapter_input, sparse=bool(sparse), **torch_only)
        if from_source and used_gates.dtype == gates.dtype:
            if not self._gates_from_source:
                self._gates_from_source = True
        else:  # gates given in the dtype used are kept as given (no reshape op per call)
            last = gates if gates is not None and used_gates.dtype == gates.dtype else \
                used_gates.reshape(*leading, self.num_experts)
            self.last_gates = last.detach() if last.requires_grad else last
        if base_output is not None:
            y = y.to(base_output.dtype)
        return y.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        experts = ", ".join(str(s) for s in self.specs)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"experts=[{experts}], backend={self.backend}")


_KIND_CODES = {"lora": 1, "adapter": 2, "hydra": 3}
_ACTIVATION_CODES = {"identity": 0, "silu": 1, "gelu": 2, "relu": 3}


def expert_signature(specs: Sequence[ExpertSpec], device: torch.device) -> torch.Tensor:
    """What a layer's experts are, as an int64 tensor [len(specs), 5] (kind, size, heads,
    activation, the float64 bits of the scaling), so a state_dict of other experts with
    tensors of the same shapes (permuted, re-scaled) is refused on load. Integer, so
    model.half() or .to(dtype) leave it alone."""
    rows = [[_KIND_CODES[s.kind], s.size, s.heads, _ACTIVATION_CODES[s.activation],
             int(torch.tensor(s.scaling, dtype=torch.float64).view(torch.int64))]
            for s in specs]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def describe_signature(signature: torch.Tensor) -> str:
    """The expert strings an expert_signature stands for (for error messages)."""
    kinds = {code: kind for kind, code in _KIND_CODES.items()}
    activations = {code: name for name, code in _ACTIVATION_CODES.items()}
    try:
        parts = []
        for kind, size, heads, activation, scaling_bits in signature.cpu().tolist():
            scaling = torch.tensor(scaling_bits, dtype=torch.int64).view(torch.float64).item()
            kind = kinds[kind]
            if kind == "adapter":
                parts.append(f"adapter:{size}:{activations[activation]}")
            else:
                head = f"{heads}:" if kind == "hydra" else ""
                parts.append(f"{kind}:{size}:{head}alpha={scaling * size:g}")
        return "[" + ", ".join(parts) + "]"
    except (KeyError, ValueError, TypeError):
        return f"an unreadable signature of shape {tuple(signature.shape)}"
