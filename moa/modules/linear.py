"""`MoALinear`, a drop-in replacement for a frozen nn.Linear: y = base(x) + the gated
mixture of its experts.

A MoALinear keeps its experts stacked raggedly (see moa_kernels/layout.py):

    shrink_weight [R, in], shrink_bias [R_ad], expand_weight [out, C], expand_bias [N_ad, out]

and its optional router in `self.router` (a `MoARouter`, router.py). The base is any frozen
module mapping [..., in] to [..., out] linearly: a plain nn.Linear (whose GEMM the backends
may fuse with the experts' shrink GEMM), or anything else (bitsandbytes 4/8-bit layers,
torchao quantized weights, hooked or FSDP-managed layers), which is called as a module,
`base(x)`, so its quantization, hooks and unsharding run as their authors meant. The math
runs in one of the backends of moa_kernels/contract.py: "reference" (per-expert loop, the
oracle), "torch" (fused PyTorch), "triton" (fused Triton kernels, CUDA or the Triton
interpreter). `expert_signature` is what a saved layer's experts were, checked on loading.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from moa.config import ExpertSpec, RouterConfig, parse_experts
from moa.modules.dispatch import (
    OFFLOADING_ADVICE,
    autocast_off,
    backend_function,
    base_compute_dtype,
    compute_dtype,
    default_adapter_dtype,
    generate_cached,
    is_plain_linear,
    offloads_weights,
    resolve_backend,
)
from moa.modules.router import MoARouter
from moa_kernels import torch_ops
from moa_kernels.activations import ACTIVATIONS
from moa_kernels.contract import (
    INPUT_RECIPE,
    SHRINK_OUTPUT,
    STACKED_ANY_DTYPE,
    accepts,
    backend_info,
    check_choice,
)
from moa_kernels.layout import EXPERT_KINDS, ExpertLayout

DEFAULT_ROUTER = RouterConfig()  # frozen, so one shared instance is safe


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


def _check_plain_base_input(x: torch.Tensor, base_weight: torch.Tensor) -> None:
    """A plain nn.Linear base refuses an input of another dtype than its weight's outside
    autocast, as nn.Linear itself does."""
    if x.dtype != base_weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input dtype {x.dtype} differs from the base weight's "
                        f"{base_weight.dtype} (nn.Linear refuses this too); cast the "
                        "input, or run under torch.autocast")


class CallPlan(NamedTuple):
    """What a forward needs beyond x and its gates, fixed for x's dtype and device, the
    autocast state and the train/eval mode: the backend's entry point, the compute dtype, a
    plain linear base's operands (None for any other base, which is called), the stacked
    expert tensors and the router's ops as the backend takes them, whether dropout runs,
    and which optional inputs beyond the contract the backend accepts
    (moa_kernels/contract.py). Built per call; kept over a generate call (`_call_plan`)."""

    function: Callable
    dtype: torch.dtype
    autocast: bool
    base_operands: dict | None
    stacked: dict
    router: object | None
    dropout: bool
    takes_input_recipe: bool
    takes_shrink_output: bool


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
        check_choice(backend)
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
        # (moa.modules.layer_router.LayerGates: its slice of a layer router's gates). A
        # plain attribute, not a hook, so a call of the layer runs no hook machinery.
        self.gate_source: Callable[[torch.Tensor], tuple | None] | None = None
        # On inside MoAModel.generate (moa.modules.prompt.prompt_key_cache): what is fixed
        # over the call (casts, the CallPlan), see moa.modules.dispatch.generate_cached.
        self.generate_cache: dict | None = None
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

    def route(self, x: torch.Tensor, balance: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The applied gates g [..., E] this layer's router gives x [..., in]; with balance,
        (g, active, scores) as `MoARouter.forward` gives them, for the load-balancing loss."""
        if self.router is None:
            raise ValueError("this MoALinear has no router (router=None); pass gates to "
                             "forward instead")
        self._check_input(x)
        if backend_info(resolve_backend(self.backend, x.device)).oracle:
            dtype = compute_dtype(x)
            with autocast_off(x):
                gates = self.router.reference_gates(x.to(dtype))
            if not balance:
                return gates
            _, active, scores = self.router(x, balance=True)  # (the loss's terms only)
            return gates, active, scores
        return self.router(x, balance)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoALinear expects a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"MoALinear expects a floating-point input, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {tuple(x.shape)}; its last dimension must be "
                             f"in_features={self.in_features}")
        if "_hf_hook" in self.__dict__ and offloads_weights(self):
            raise ValueError(
                "this MoALinear runs under an accelerate hook that offloads its weights "
                "(cpu_offload, disk_offload, or dispatch_model with offloaded modules), which "
                "MoA does not support: its layers read their routers' and experts' tensors "
                "directly, and such a hook puts back only the tensors of the module it is on; "
                + OFFLOADING_ADVICE)
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
        input_recipe = self._take_input_recipe(x)
        if not self.active:
            self.last_gates = None
            return self.base(x)
        gates, sparse, shrink_output, from_source = self._gates(x, gates, sparse)
        if sparse is None:
            sparse = gates is None and self.router.config.is_sparse
        plan = self._call_plan(x)
        base_output = None if plan.base_operands is not None else self.base(x)
        if plan.autocast:
            with torch.autocast(x.device.type, enabled=False):
                y, used_gates = self._mix(plan, x, gates, bool(sparse), base_output,
                                          input_recipe, shrink_output)
        else:
            y, used_gates = self._mix(plan, x, gates, bool(sparse), base_output, input_recipe,
                                      shrink_output)
        self._record_gates(gates, used_gates, from_source, x.shape[:-1])
        if base_output is not None:
            y = y.to(base_output.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _mix(self, plan: CallPlan, x: torch.Tensor, gates: torch.Tensor | None, sparse: bool,
             base_output: torch.Tensor | None, input_recipe, shrink_output
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backend's (y [T, out], applied gates [T, E]) for x flattened, autocast off.
        The optional inputs go where the backend takes them and the call can give them:
        both need a plain linear base computed by the backend and no dropout; the input
        recipe describes x itself (x already in the compute dtype), the shrink output
        [T, R] (dense mixtures only) must be in the compute dtype."""
        dtype = plan.dtype
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        adapter_input = self.dropout(flat) if plan.dropout else None
        extras = {}
        if plan.base_operands is None:
            base = {"base_output": base_output.reshape(-1, self.out_features).to(dtype)}
        else:
            base = plan.base_operands
            if adapter_input is None:
                if input_recipe is not None and plan.takes_input_recipe and dtype == x.dtype:
                    extras[INPUT_RECIPE] = input_recipe
                if shrink_output is not None and not sparse and plan.takes_shrink_output \
                        and shrink_output.dtype == dtype:
                    extras[SHRINK_OUTPUT] = shrink_output
        return plan.function(
            flat, **base, **plan.stacked, router=plan.router if gates is None else None,
            gates=None if gates is None else gates.reshape(-1, self.num_experts),
            adapter_input=adapter_input, sparse=sparse, **extras)

    def _call_plan(self, x: torch.Tensor) -> CallPlan:
        """The CallPlan for x: made per call, and kept over a generate call (in
        generate_cache, while grad mode is off, outside torch.compile), where the backend,
        the base, the weights and their casts cannot change: a decoding step then looks it
        up instead of redoing the backend choice, its checks and the casts' lookups."""
        cache = self.generate_cache
        if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._make_call_plan(x)
        device_type = x.device.type
        autocast = torch.get_autocast_dtype(device_type) \
            if torch.is_autocast_enabled(device_type) else None
        key = ("call", x.dtype, x.device, autocast, self.training)
        plan = cache.get(key)
        if plan is None:
            plan = cache[key] = self._make_call_plan(x)
        return plan

    def _make_call_plan(self, x: torch.Tensor) -> CallPlan:
        dtype = compute_dtype(x)
        backend = resolve_backend(self.backend, x.device)
        function = backend_function(backend, x)
        base = self.base  # (each nn.Module attribute read is a Python call: read once)
        base_operands = None
        if is_plain_linear(base):
            base_weight, base_bias = base.weight, base.bias
            _check_plain_base_input(x, base_weight)
            base_operands = self._base_operands(base_weight, base_bias, dtype)
        shrink_weight, shrink_bias, expand_weight, expand_bias = \
            self._stacked_operands(backend, dtype)
        return CallPlan(
            function, dtype, torch.is_autocast_enabled(x.device.type), base_operands,
            {"layout": self.layout, "shrink_weight": shrink_weight, "shrink_bias": shrink_bias,
             "expand_weight": expand_weight, "expand_bias": expand_bias},
            None if self.router is None else self._router_ops(dtype),
            self.training and isinstance(self.dropout, nn.Dropout),
            accepts(backend, INPUT_RECIPE), accepts(backend, SHRINK_OUTPUT))

    def _take_input_recipe(self, x: torch.Tensor) -> torch_ops.InputRecipe | None:
        """The InputRecipe a hook left for a call on this very x (consumed either way)."""
        pending = self.next_input_recipe
        if pending is None:
            return None
        self.next_input_recipe = None
        return pending[1] if pending[0] is x else None

    def _gates(self, x: torch.Tensor, gates: torch.Tensor | None, sparse: bool | None):
        """(gates, sparse, shrink_output, from_source) of this call: gates given (checked
        here), or the gate source's (it checks its own; with its sparse mode unless sparse is
        given, and x's shrink output where it computed one), or None for the layer's
        router."""
        if gates is not None:
            self._check_gates(gates, x)
            return gates, sparse, None, False
        if self.gate_source is not None:
            shared = self.gate_source(x)
            if shared is not None:
                gates, shared_sparse, shrink_output = shared
                return gates, shared_sparse if sparse is None else sparse, shrink_output, True
        if self.router is None:
            raise ValueError("this MoALinear has no router (router=None): forward needs "
                             f"gates of shape {(*x.shape[:-1], self.num_experts)}")
        return None, sparse, None, False

    def _base_operands(self, base_weight: torch.Tensor, base_bias: torch.Tensor | None,
                       dtype: torch.dtype) -> dict:
        """The contract's base for a plain linear: its weight and bias in dtype (casts kept
        over a generate call)."""
        if base_weight.dtype == dtype and (base_bias is None or base_bias.dtype == dtype):
            return {"base_weight": base_weight, "base_bias": base_bias}
        return generate_cached(self, ("base", dtype), lambda: {
            "base_weight": base_weight.to(dtype),
            "base_bias": None if base_bias is None else base_bias.to(dtype)})

    def _stacked_operands(self, backend: str, dtype: torch.dtype) -> tuple:
        """The stacked expert tensors for `backend`: in dtype, the casts kept over a generate
        call (tensors already in dtype are used as they are: nothing to cache, and under
        torch.compile no cache lookup to guard on); or the parameters themselves where the
        backend takes them in another dtype (STACKED_ANY_DTYPE: it casts while packing and
        caches the packed weights per version of the parameters, which a cast made here,
        a new tensor at every call, would miss)."""
        stacked = self._stacked()
        if stacked[0].dtype != dtype and not accepts(backend, STACKED_ANY_DTYPE):
            stacked = generate_cached(self, ("stacked", dtype), lambda: self._stacked(dtype))
        return stacked

    def _router_ops(self, dtype: torch.dtype):
        """The router's RouterOps in dtype (kept over a generate call)."""
        router = self.router
        return generate_cached(router, ("ops", dtype), lambda: router.ops(dtype))

    def _record_gates(self, gates: torch.Tensor | None, used_gates: torch.Tensor,
                      from_source: bool, leading: torch.Size) -> None:
        """Keep what last_gates reads: the gate source's gates stay there (only the switch to
        them is written, so a decoding step stores nothing per layer call); gates given in
        the dtype used are kept as given (no reshape op per call)."""
        if from_source and used_gates.dtype == gates.dtype:
            if not self._gates_from_source:
                self._gates_from_source = True
            return
        last = gates if gates is not None and used_gates.dtype == gates.dtype else \
            used_gates.reshape(*leading, self.num_experts)
        self.last_gates = last.detach() if last.requires_grad else last

    def extra_repr(self) -> str:
        experts = ", ".join(str(s) for s in self.specs)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"experts=[{experts}], backend={self.backend}")


_KIND_CODES = dict(EXPERT_KINDS)  # the tables' codes: saved in every adapter file
_ACTIVATION_CODES = {a.name: a.code for a in ACTIVATIONS}


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


def expert_names(layer: MoALinear) -> list[str]:
    """A distinct name per gated expert of a MoALinear: its spec ("lora:8"), numbered where
    specs repeat ("lora:8#0", "lora:8#1", ...); hydra heads always numbered ("hydra:8:8#0"
    ..., a repeated hydra spec continuing the count)."""
    texts = [str(spec) for spec in layer.specs]
    numbered: dict[str, int] = {}  # next number per spec text
    names = []
    for text, spec in zip(texts, layer.specs):
        if spec.kind == "hydra" or texts.count(text) > 1:
            first = numbered.get(text, 0)
            numbered[text] = first + spec.num_experts
            names += [f"{text}#{n}" for n in range(first, first + spec.num_experts)]
        else:
            names.append(text)
    return names


__all__ = ["DEFAULT_ROUTER", "MoALinear", "describe_signature", "expert_names",
           "expert_signature"]
