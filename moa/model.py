"""Injection into transformers models: `get_moa_model` and `MoAModel`.

`get_moa_model(model, config)` freezes the model, replaces each targeted nn.Linear with a
`MoALinear`, and with router_scope="layer" adds the layer routers, parallel adapters and
prompt experts of moa/experts.py. The module tree keeps its names (a MoALinear sits where
its nn.Linear was, the frozen layer as its `.base`), so the model's own forward, `generate`
and gradient checkpointing run unchanged.

Saved form (`save_pretrained`): `moa_config.json` (MoAConfig.to_dict) and
`adapter_model.safetensors` with the MoA tensors only, named as in the base model's
`named_parameters()` ("model.layers.0.self_attn.q_proj.shrink_weight",
"model.layers.0.moa_router.router.w1_weight", ...). Loading is strict: a missing, extra or
differently shaped tensor is an error that names it. moa/serialization.py writes both files
or neither and checks on loading that they belong together.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moa.config import DEFAULT_EXPERT_KEY, MoAConfig, layer_index, module_matches
from moa.experts import (
    GateCollector,
    LayerRouter,
    ParallelAdapter,
    PromptExpert,
    attach_prompt,
    check_prompt_attention,
    collecting_pre_hook,
    constant_gates_pre_hook,
    gates_pre_hook,
    load_balancing_loss,
    prompt_key_cache,
)
from moa.layers import ORDINARY_TENSOR_TYPES, MoALinear, default_adapter_dtype
from moa.serialization import WEIGHTS_NAME, load_adapter, load_state_into, save_adapter
from moa.stats import expert_names, format_router_stats, router_stats

MOA_MODULES = (MoALinear, LayerRouter, ParallelAdapter, PromptExpert)


def get_moa_model(model: nn.Module, config: MoAConfig | None = None) -> MoAModel:
    """Inject MoA into a transformers model (in place) and wrap it; see `MoAModel`."""
    return MoAModel(model, MoAConfig() if config is None else config)


# ---------------------------------------------------------------------------------------
# finding what to adapt
# ---------------------------------------------------------------------------------------

def _unmatched_error(model: nn.Module, patterns: list[str], linear_names: list[str]) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    hints = []
    for pattern in patterns:
        close = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.4)
        hints.append(f"{pattern!r} (similar: {', '.join(close) if close else 'none'})")
    return (f"target_modules match no module of this {type(model).__name__}: "
            f"{'; '.join(hints)}. Its nn.Linear module names end in: {', '.join(leaves)}")


def _leaves(names: list[str]) -> str:
    return ", ".join(sorted({name.rsplit(".", 1)[-1] for name in names}))


def _layers_text(layers: list[int]) -> str:
    """[0, 1] as "[0, 1]", 0 to 31 as "0..31"."""
    if len(layers) > 3 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


def _peft_owner(name: str, by_name: dict[str, nn.Module]) -> str | None:
    """The innermost of module `name` and its ancestors that is a PEFT module, or None."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        owner = ".".join(parts[:depth])
        if type(by_name.get(owner)).__module__.split(".")[0] == "peft":
            return owner
    return None


def _peft_error(name: str, owner: str, by_name: dict[str, nn.Module]) -> str:
    wrapper = type(by_name[owner])
    where = "" if owner == name else \
        "in the PEFT model itself, " if not owner else f"inside {owner!r}, "
    return (f"target_modules match {name!r}, which is already wrapped by PEFT ({where}a "
            f"{wrapper.__module__}.{wrapper.__qualname__}); adapt the base model, not a PEFT "
            f"model: pass the model without PEFT's adapters (a PEFT model's unload() or "
            f"merge_and_unload() returns it)")


def _unused_expert_key_error(key: str, config: MoAConfig, adapted: list[str],
                             names: list[str]) -> str:
    outside = [n for n in names if config.is_target(n) and module_matches(n, [key])]
    elsewhere = [n for n in names if module_matches(n, [key])]
    if outside:
        reason = (f"It names only modules outside layers_to_transform="
                  f"{config.layers_to_transform} (such as {outside[0]!r}).")
    elif elsewhere:
        reason = (f"It names {elsewhere[0]!r}, which target_modules and exclude_modules "
                  f"leave unadapted.")
    else:
        depth = key.count(".") + 1
        suffixes = sorted({".".join(n.split(".")[-depth:]) for n in adapted})
        close = [repr(c) for c in difflib.get_close_matches(key, suffixes, n=3, cutoff=0.5)]
        reason = (f"Did you mean {' or '.join(', '.join(close).rsplit(', ', 1))}?" if close
                  else "No module name ends in it.")
    return (f"experts key {key!r} matches no adapted module, so its experts would never be "
            f"used. Keys are dotted suffixes of adapted module names (these end in: "
            f"{_leaves(adapted)}), or {DEFAULT_EXPERT_KEY!r} for the default. {reason}")


def find_targets(model: nn.Module, config: MoAConfig) -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) pairs `config` adapts, in module order.

    The root module (name "") is never a target, so a regex such as ".*" is judged by the
    named modules it matches. Raises ValueError naming the pattern when a target matches
    nothing (with similar module names), when it matches a module that is not an nn.Linear
    or is wrapped by PEFT, when layers_to_transform names a layer the model lacks or leaves
    nothing, or when a key of an experts dict matches no adapted module.
    """
    modules = [(n, m) for n, m in model.named_modules() if n]
    by_name = dict(model.named_modules())
    linear_names = [n for n, m in modules if isinstance(m, nn.Linear)]
    if isinstance(config.target_modules, str):
        unmatched = [] if any(module_matches(n, config.target_modules) for n, _ in modules) \
            else [config.target_modules]
    else:
        unmatched = [p for p in config.target_modules
                     if not any(n == p or n.endswith("." + p) for n, _ in modules)]
    if unmatched:
        raise ValueError(_unmatched_error(model, unmatched, linear_names))
    targets = []
    for name, module in modules:
        if not config.is_target(name):
            continue
        if (owner := _peft_owner(name, by_name)) is not None:
            raise ValueError(_peft_error(name, owner, by_name))
        if not isinstance(module, nn.Linear):
            hint = ""
            if isinstance(config.target_modules, str) and linear_names:
                hint = (f" (the regex {config.target_modules!r} must match nn.Linear names "
                        f"only, such as {linear_names[0]!r})")
            raise ValueError(f"target_modules match {name!r}, a {type(module).__name__}; only "
                             f"nn.Linear modules can be adapted{hint}")
        if config.in_layers(name):
            targets.append((name, module))
    found = sorted({i for n in linear_names if (i := layer_index(n)) is not None})
    missing = [i for i in config.layers_to_transform or [] if i not in found]
    if not targets:
        matched = [n for n, _ in modules if module_matches(n, config.target_modules)]
        if not any(config.is_target(n) for n in matched):
            raise ValueError(f"exclude_modules={config.exclude_modules!r} excludes every module "
                             f"target_modules matches ({len(matched)} of them)")
        raise ValueError(f"layers_to_transform={config.layers_to_transform} leaves no target "
                         f"module; the model's layers are {_layers_text(found)}")
    if missing:
        raise ValueError(f"layers_to_transform={config.layers_to_transform} names "
                         f"{'layers' if len(missing) > 1 else 'layer'} "
                         f"{', '.join(map(str, missing))}, which this {type(model).__name__} "
                         f"does not have; the model's layers are {_layers_text(found)}")
    if isinstance(config.experts, dict):
        adapted = [n for n, _ in targets]
        for key in config.experts:
            if key != DEFAULT_EXPERT_KEY and not any(module_matches(n, [key]) for n in adapted):
                raise ValueError(_unused_expert_key_error(key, config, adapted,
                                                          [n for n, _ in modules]))
    return targets


def find_decoder_layers(model: nn.Module, config: MoAConfig) -> dict[str, nn.Module]:
    """Decoder layers (modules with an `input_layernorm`) within layers_to_transform."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(getattr(module, "input_layernorm", None), nn.Module)
              and config.in_layers(name)}
    if not layers:
        raise ValueError(f"router_scope='layer' needs pre-norm decoder layers with an "
                         f"input_layernorm (Llama-style); {type(model).__name__} has none "
                         f"(within layers_to_transform). Use router_scope='module' with "
                         f"parallel_adapter=None and prompt_length=None")
    return layers


def _layer_of(name: str, layers: dict[str, nn.Module]) -> str:
    owners = [layer for layer in layers if name.startswith(layer + ".")]
    if not owners:
        raise ValueError(f"router_scope='layer' routes inside decoder layers, but target "
                         f"{name!r} lies outside all of them ({len(layers)} layers such as "
                         f"{next(iter(layers))!r}); exclude it or use router_scope='module'")
    return max(owners, key=len)


def _factory(module: nn.Module, adapter_dtype: str | None) -> dict:
    """Device and dtype of the layer-level experts beside `module`'s parameters."""
    param = next(module.parameters())
    if adapter_dtype is None:
        dtype = default_adapter_dtype(param.dtype)
    elif adapter_dtype == "base":
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    else:
        dtype = getattr(torch, adapter_dtype)
    return {"device": param.device, "dtype": dtype}


def _layer_adapter_dtype(adapter_dtype: str | None) -> torch.dtype | str | None:
    """MoAConfig.adapter_dtype as MoALinear takes it."""
    if adapter_dtype is None or adapter_dtype == "base":
        return adapter_dtype
    return getattr(torch, adapter_dtype)


# ---------------------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------------------

class MoAModel(nn.Module):
    """A transformers model with MoA injected; attributes it lacks come from the model.

    Args:
        model: the model to adapt (modified in place; all its parameters are frozen).
        config: the MoAConfig.
    Attributes:
        model: the adapted transformers model; moa_config: the MoAConfig; last_aux_loss:
            the load-balancing loss of the last forward (aux_loss_coef > 0), with its graph.
    """

    def __init__(self, model: nn.Module, config: MoAConfig) -> None:
        super().__init__()
        if not isinstance(config, MoAConfig):
            raise TypeError(f"config must be a MoAConfig, got {type(config).__name__}")
        if isinstance(model, MoAModel) or any(isinstance(m, MOA_MODULES)
                                               for m in model.modules()):
            raise ValueError("this model already has MoA modules; inject into a fresh model")
        self.model = model
        self.moa_config = copy.deepcopy(config)  # what save_pretrained writes stays put
        self.last_aux_loss: torch.Tensor | None = None
        self._collector = GateCollector()
        self._swaps: list[tuple[nn.Module, str, MoALinear, nn.Linear]] = []
        self._hooks: list = []
        self._added: list[tuple[nn.Module, str]] = []  # (module, attribute) of layer experts
        self._requires_grad = [(param, param.requires_grad) for param in model.parameters()]
        self._enabled = True
        model.requires_grad_(False)
        try:
            self._inject()
        except BaseException:
            self.unload()  # a failed injection leaves the model as it was
            raise

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        try:
            return getattr(self.model, name)
        except AttributeError:
            raise AttributeError(f"neither MoAModel nor its {type(self.model).__name__} has "
                                 f"an attribute {name!r}") from None

    # ---- injection -----------------------------------------------------------------------

    def _inject(self) -> None:
        config, model = self.moa_config, self.model
        targets = find_targets(model, config)
        layers = find_decoder_layers(model, config) if config.router_scope == "layer" else {}
        per_layer: dict[str, list[tuple[str, MoALinear]]] = {name: [] for name in layers}
        module_router = config.router if config.router_scope == "module" else None
        for name, base in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = MoALinear(base, config.experts_for(name), module_router,
                              dropout=config.dropout, backend=config.backend,
                              adapter_dtype=_layer_adapter_dtype(config.adapter_dtype))
            setattr(parent, child, layer)
            self._swaps.append((parent, child, layer, base))
            if config.router_scope == "layer":
                per_layer[_layer_of(name, layers)].append((name, layer))
            elif config.router is None:
                self._hooks.append(layer.register_forward_pre_hook(
                    constant_gates_pre_hook, with_kwargs=True))
            elif config.aux_loss_coef > 0:
                self._hooks.append(layer.register_forward_pre_hook(
                    collecting_pre_hook(self._collector), with_kwargs=True))
        for layer_name, layer in layers.items():
            self._wire_layer(layer_name, layer, per_layer[layer_name])

    def _wire_layer(self, layer_name: str, layer: nn.Module,
                    adapted: list[tuple[str, MoALinear]]) -> None:
        config = self.moa_config
        model_config = getattr(self.model, "config", None)
        if hasattr(model_config, "get_text_config"):  # composite (e.g. vision-language) models
            model_config = model_config.get_text_config()
        hidden = getattr(model_config, "hidden_size", None)
        if hidden is None:
            raise ValueError("router_scope='layer' needs model.config.hidden_size (or the "
                             "text config's, for a composite model)")
        names, slices = [], []
        for name, module in adapted:
            relative = name[len(layer_name) + 1:]
            slices.append((len(names), len(names) + module.num_experts, name, module))
            names += [f"{relative}:{e}" for e in expert_names(module)]
        adapter_index = prompt_index = None
        if config.parallel_adapter is not None:
            if not isinstance(getattr(layer, "mlp", None), nn.Module):
                raise ValueError(f"the parallel adapter sits beside the MLP, but {layer_name!r}"
                                 f" ({type(layer).__name__}) has no `mlp` module")
            adapter_index = len(names)
            names.append(f"parallel_adapter:adapter:{config.parallel_adapter}:"
                         f"{config.parallel_adapter_activation}")
        if config.prompt_length is not None:
            attention = getattr(layer, "self_attn", None)
            if attention is None:
                raise ValueError(f"the prompt expert sits in attention, but {layer_name!r} "
                                 f"({type(layer).__name__}) has no `self_attn` module")
            check_prompt_attention(attention, f"{layer_name}.self_attn")
            prompt_index = len(names)
            names.append(f"prompt:{config.prompt_length}")
        if not names:
            return
        factory = _factory(layer.input_layernorm if any(True for _ in
                           layer.input_layernorm.parameters()) else layer,
                           config.adapter_dtype)
        if config.adapter_dtype == "base" and adapted:  # the adapted linears' compute dtype
            factory["dtype"] = adapted[0][1].shrink_weight.dtype
        router = LayerRouter(hidden, names, config.router, self._collector, **factory)
        self._add(layer, "moa_router", router)
        self._hooks.append(layer.input_layernorm.register_forward_hook(router.input_norm_hook))
        for start, stop, name, module in slices:
            self._hooks.append(module.register_forward_pre_hook(
                gates_pre_hook(router, start, stop, name), with_kwargs=True))
        if adapter_index is not None:
            adapter = ParallelAdapter(hidden, hidden, config.parallel_adapter,
                                      config.parallel_adapter_activation, config.dropout,
                                      **factory)
            self._add(layer, "moa_parallel_adapter", adapter)
            self._hooks.append(layer.mlp.register_forward_hook(
                adapter.mlp_hook(router, adapter_index, f"parallel adapter of {layer_name}"),
                with_kwargs=True))
        if prompt_index is not None:
            prompt = PromptExpert(layer.self_attn, config.prompt_length, hidden, **factory)
            self._add(layer.self_attn, "moa_prompt", prompt)
            self._hooks += attach_prompt(layer.self_attn, prompt, router, prompt_index,
                                         f"{layer_name}.self_attn")

    def _add(self, owner: nn.Module, attribute: str, module: nn.Module) -> None:
        setattr(owner, attribute, module)
        self._added.append((owner, attribute))

    def unload(self) -> nn.Module:
        """Take every MoA module and hook out again and give back the base model as it was
        before injection (frozen flags included). This MoAModel is empty afterwards."""
        for hook in self._hooks:
            hook.remove()
        for parent, child, _, base in self._swaps:
            setattr(parent, child, base)
        for owner, attribute in self._added:
            delattr(owner, attribute)
        for param, requires_grad in self._requires_grad:
            param.requires_grad_(requires_grad)
        self._hooks, self._swaps, self._added, self._requires_grad = [], [], [], []
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """Fold the experts into the frozen weights (W += sum_e scaling_e B_e A_e) and give
        back the plain model, as PEFT's merge_and_unload does. Only a mixture without a
        router (every gate 1: plain LoRA, HydraLoRA heads summed) of lora and hydra experts
        can be merged: routed gates depend on each token, and an adapter's non-linearity,
        the parallel adapter and the prompt expert are not weights."""
        if self.moa_config.router is not None:
            raise ValueError(f"a routed mixture cannot be merged: its gates depend on each "
                             f"token (router mode {self.moa_config.router.mode!r}); unload() "
                             "gives the base model, or keep the MoAModel")
        if any(isinstance(getattr(owner, attribute), (ParallelAdapter, PromptExpert))
               for owner, attribute in self._added):
            raise ValueError("the parallel adapter and the prompt expert cannot be merged "
                             "into weights; unload() gives the base model")
        for parent, child, layer, _ in self._swaps:
            adapters = [str(s) for s in layer.specs if s.kind == "adapter"]
            if adapters:
                raise ValueError(f"{type(parent).__name__}.{child} has adapter experts "
                                 f"({', '.join(adapters)}), whose non-linearity cannot be "
                                 "merged into a weight")
        self._check_mergeable_weights()
        with torch.no_grad():
            for _, _, layer, base in self._swaps:
                scalings = [s.scaling for s in layer.specs for _ in range(s.num_experts)]
                delta = sum(scaling * params["lora_B"].double() @ params["lora_A"].double()
                            for scaling, params in zip(scalings, layer.expert_parameters()))
                base.weight += delta.to(base.weight.dtype)
        return self.unload()

    def _check_mergeable_weights(self) -> None:
        """Refuse, before anything changes, bases whose weight is not a plain float tensor
        (quantized) and weights shared with another module (tied embeddings)."""
        names = {id(module): name for name, module in self.model.named_modules()}
        owners: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(name)
        for _, _, layer, base in self._swaps:
            name = names.get(id(layer), type(base).__name__)
            weight = getattr(base, "weight", None)
            if not isinstance(base, nn.Linear) or type(weight) not in ORDINARY_TENSOR_TYPES \
                    or not weight.dtype.is_floating_point \
                    or getattr(weight, "bnb_quantized", False):
                raise ValueError(f"{name} has a quantized base ({type(base).__name__}, weight "
                                 f"{type(weight).__name__}); merging into it would need "
                                 "dequantizing, merging and requantizing, which changes the "
                                 "outputs. Keep the MoAModel, or load the base unquantized, "
                                 "merge, then quantize the merged model")
            shared = [n for n in owners.get(id(weight), []) if n != f"{name}.base.weight"]
            if shared:
                raise ValueError(f"{name}'s weight is shared with {', '.join(shared)} (tied "
                                 "weights, e.g. tied input and output embeddings): merging "
                                 "would change them too. Untie them first (give the module "
                                 "its own copy of the weight) or leave it out of "
                                 "target_modules")

    # ---- parameters ----------------------------------------------------------------------

    def moa_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of every MoA tensor (experts and routers, not the frozen base),
        named as in the base model's named_parameters()."""
        for name, module in self.model.named_modules():
            if isinstance(module, MOA_MODULES):
                for param_name, param in module.named_parameters():
                    if isinstance(module, MoALinear) and param_name.startswith("base."):
                        continue
                    yield f"{name}.{param_name}", param

    def moa_state_dict(self) -> dict[str, torch.Tensor]:
        """The MoA tensors by name (detached, live)."""
        return {name: param.detach() for name, param in self.moa_named_parameters()}

    def trainable_parameter_count(self) -> int:
        """Number of trainable elements (parameters with requires_grad)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def print_trainable_parameters(self) -> None:
        """Print "trainable params: N || all params: M || trainable%: P" as PEFT does."""
        trainable = self.trainable_parameter_count()
        total = sum(p.numel() for p in self.model.parameters())
        percent = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {percent:.4f}")

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the MoA modules in it), as PEFT names it."""
        return self.model

    # ---- running ------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        """The model's forward (its output, unchanged unless aux_loss_coef > 0, in which case
        aux_loss_coef * the mean load-balancing loss of all router calls is added to the
        loss)."""
        for key, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                           ("labels", labels)):
            if value is not None:
                kwargs[key] = value
        coef = self.moa_config.aux_loss_coef
        self._collector.gates = []
        self._collector.active = coef > 0 and self._enabled
        # Padding does not count towards the balance (a 2-D attention mask marks it).
        self._collector.token_mask = attention_mask if attention_mask is not None and \
            attention_mask.dim() == 2 else None
        try:
            output = self.model(**kwargs)
        finally:
            self._collector.active = False
            self._collector.token_mask = None
            gates, self._collector.gates = self._collector.gates, []
        self.last_aux_loss = None
        if gates:
            aux = torch.stack([load_balancing_loss(g) for g in gates]).mean()
            self.last_aux_loss = aux
            if isinstance(output, tuple):
                if labels is not None:
                    output = (output[0] + coef * aux.to(output[0].dtype), *output[1:])
            elif getattr(output, "loss", None) is not None:
                output.loss = output.loss + coef * aux.to(output.loss.dtype)
        return output

    def generate(self, *args, **kwargs):
        """The model's generate, adapters on (unless inside disable_adapters). The prompt
        experts' keys and values are computed once per call, not once per decoded token."""
        with prompt_key_cache(self.model):
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside, the model computes exactly its base outputs: every MoA module's `active`
        flag is off (a MoALinear returns base(x), the layer-level experts stand down). The
        module tree does not change, so eval(), .to(), state_dict() and parameters() inside
        reach every MoA module."""
        if not self._enabled:
            yield
            return
        self._set_enabled(False)
        try:
            yield
        finally:
            self._set_enabled(True)

    def _set_enabled(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, MOA_MODULES):
                module.active = enabled
                if isinstance(module, (MoALinear, LayerRouter)):
                    module.last_gates = None  # statistics describe the last forward only
                if isinstance(module, LayerRouter):
                    module.gates = None
        self._enabled = enabled

    def router_stats(self) -> dict[str, dict]:
        """Per router: expert names, mean gate and fraction of tokens active in the last
        forward (see moa.stats.router_stats)."""
        return router_stats(self.model)

    def print_router_stats(self) -> None:
        """Print router_stats() as tables (see moa.stats.format_router_stats)."""
        print(format_router_stats(self.router_stats()))

    # ---- saving and loading -------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write moa_config.json and adapter_model.safetensors (MoA tensors only) into
        `directory`, both or neither: the previous adapter there stays loadable and unchanged
        if saving fails or is interrupted, and other files in it are left alone. The weights'
        metadata names the base model (its config's name_or_path), the moa version and the
        config and per-module experts they were saved with, which loading checks. Refused
        (RuntimeError) after unload(); see moa.serialization."""
        save_adapter(self, directory)

    def load_moa_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` into the MoA tensors. Every MoA tensor must be present with its shape
        and nothing else may be; otherwise ValueError names the offending keys."""
        load_state_into(self, state)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike,
                        is_trainable: bool = True, backend: str | None = None) -> MoAModel:
        """Inject the saved configuration into `model` and load the saved MoA tensors. The
        weights must be the ones saved with moa_config.json (see moa.serialization); on
        any error the model is left as it was.

        Args:
            model: a fresh base model (the one the adapters were trained on).
            directory: what save_pretrained wrote (a Trainer checkpoint holds the whole
                model instead: save the adapter with MoAModel.save_pretrained).
            is_trainable: False freezes the MoA tensors too (inference).
            backend: run with this backend instead of the saved one (e.g. "torch" on a
                machine without a GPU for a config saved with "triton").
        """
        return load_adapter(cls, model, directory, is_trainable, backend)


__all__ = ["MoAModel", "WEIGHTS_NAME", "find_targets", "get_moa_model"]
