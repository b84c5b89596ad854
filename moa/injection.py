"""Injection: finding what to adapt in a transformers model and wiring MoA into it.

`find_targets` picks the nn.Linear modules a MoAConfig adapts (with errors that name the
pattern and similar module names), `find_decoder_layers` the decoder layers that get a layer
router. `Injection` replaces each target by a `MoALinear` in place (the frozen layer as its
`.base`, so module names are kept) and, with router_scope="layer", adds per decoder layer the
router, parallel adapter and prompt expert of moa/modules/ with the hooks that connect
them (where each family keeps its norm, attention, MLP and query: moa/families.py); it
records every change so that `remove` takes all of it out again. MoAModel
(moa/model.py) owns one Injection; nothing here knows about saving or the wrapper.
"""

from __future__ import annotations

import difflib
import inspect

import torch
from torch import nn

from moa.config import DEFAULT_EXPERT_KEY, LAYER_SCOPES, MoAConfig, layer_index, module_matches
from moa.families import check_prompt_attention, family_of
from moa.modules.aux_loss import GateCollector, collecting_pre_hook
from moa.modules.dispatch import OFFLOADING_ADVICE, default_adapter_dtype, offloads_weights
from moa.modules.layer_router import (
    LayerGates,
    LayerRouter,
    MaskPreHook,
    RecomputeMaskHook,
    RoutingContext,
    constant_gates_pre_hook,
)
from moa.modules.linear import MoALinear, expert_names
from moa.modules.parallel_adapter import NormRecordHook, ParallelAdapter, is_pure_norm
from moa.modules.prompt import PromptExpert, attach_prompt

MOA_MODULES = (MoALinear, LayerRouter, ParallelAdapter, PromptExpert)
# The adapter groups a "group" router gates (UniPELT): the adapted modules' experts, the
# parallel adapter, the prompt expert.
MODULE_GROUP, PARALLEL_ADAPTER_GROUP, PROMPT_GROUP = 0, 1, 2
# Norms of a decoder layer that may produce the MLP input (Llama-style; Gemma2's
# pre-feedforward norm): the parallel adapter recomputes its input from theirs.
MLP_INPUT_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm")

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


def check_not_offloaded(model: nn.Module) -> None:
    """Raise ValueError when accelerate offloads some of the model's weights: its hooks put
    them back by their names at load time around each forward, and injection renames the
    adapted linears' weights and adds tensors those hooks do not know (the model then
    computes with empty tensors)."""
    offloaded = [name or type(model).__name__ for name, module in model.named_modules()
                 if offloads_weights(module)]
    if offloaded:
        raise ValueError(
            f"accelerate offloads the weights of {len(offloaded)} "
            f"{'module' if len(offloaded) == 1 else 'modules'} of this model (such as "
            f"{offloaded[0]!r}): a device_map put part of it on 'cpu' or 'disk' beside a GPU, "
            f"or cpu_offload/disk_offload was applied. MoA cannot be injected into an "
            f"offloaded model; " + OFFLOADING_ADVICE)


def find_decoder_layers(model: nn.Module, config: MoAConfig) -> dict[str, nn.Module]:
    """Decoder layers (of a family in moa/families.py, or with an `input_layernorm`) within
    layers_to_transform."""
    layers = {name: module for name, module in model.named_modules()
              if family_of(module) is not None and config.in_layers(name)}
    if not layers:
        raise ValueError(f"router_scope={config.router_scope!r} needs pre-norm decoder layers "
                         f"with an "
                         f"input_layernorm (Llama-style); {type(model).__name__} has none "
                         f"(within layers_to_transform). Use router_scope='module' with "
                         f"parallel_adapter=None and prompt_length=None")
    return layers


def _mask_owners(model: nn.Module, layers: dict[str, nn.Module]) -> list[nn.Module]:
    """Where instance routers take the attention mask: the decoder stacks holding `layers`
    (the nearest module above each layer that is not a container: LlamaModel for
    "model.layers.0"), which the model calls and a user may call directly, where their
    forward takes an attention_mask; else the model itself."""
    owners: dict[int, nn.Module] = {}
    for name in layers:
        parts = name.split(".")
        for end in range(len(parts) - 1, -1, -1):
            owner = model.get_submodule(".".join(parts[:end]))
            if not isinstance(owner, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                break
        if "attention_mask" in inspect.signature(owner.forward).parameters:
            owners[id(owner)] = owner
    return list(owners.values()) or [model]


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
# wiring
# ---------------------------------------------------------------------------------------

class Injection:
    """MoA injected into `model` by `config`, with everything it changed recorded.

    Args:
        model: the model to adapt (modified in place by `inject`).
        config: the MoAConfig.
        collector: gathers router gates for the load-balancing loss (MoAModel's).
    Attributes:
        swaps: (parent, child name, MoALinear, the nn.Linear it replaced) per target.
        hooks: every hook handle registered. added: (module, attribute) of layer experts.
        A MoALinear under a layer router reads its gates through its `gate_source`.
    """

    def __init__(self, model: nn.Module, config: MoAConfig, collector: GateCollector) -> None:
        self.model, self.config, self.collector = model, config, collector
        self.swaps: list[tuple[nn.Module, str, MoALinear, nn.Linear]] = []
        self.hooks: list = []
        self.added: list[tuple[nn.Module, str]] = []
        self.context = RoutingContext()  # the attention mask, for instance routers

    def inject(self) -> None:
        """Swap in the MoALinear layers and wire the layer-level experts (see the module
        docstring). Raises ValueError for a config this model cannot take; what was changed
        before the error stays recorded, so `remove` undoes it."""
        config, model = self.config, self.model
        check_not_offloaded(model)
        targets = find_targets(model, config)
        layer_scope = config.router_scope in LAYER_SCOPES
        layers = find_decoder_layers(model, config) if layer_scope else {}
        per_layer: dict[str, list[tuple[str, MoALinear]]] = {name: [] for name in layers}
        module_router = config.router if config.router_scope == "module" else None
        for name, base in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = MoALinear(base, config.experts_for(name), module_router,
                              dropout=config.dropout, backend=config.backend,
                              adapter_dtype=_layer_adapter_dtype(config.adapter_dtype))
            setattr(parent, child, layer)
            self.swaps.append((parent, child, layer, base))
            if layer_scope:
                per_layer[_layer_of(name, layers)].append((name, layer))
            elif config.router is None:
                self.hooks.append(layer.register_forward_pre_hook(
                    constant_gates_pre_hook, with_kwargs=True))
            elif config.aux_loss_coef > 0:
                self.hooks.append(layer.register_forward_pre_hook(
                    collecting_pre_hook(self.collector), with_kwargs=True))
        for layer_name, layer in layers.items():
            self.wire_layer(layer_name, layer, per_layer[layer_name])
        if config.router_scope == "instance":
            for owner in _mask_owners(model, layers):
                self.hooks.append(owner.register_forward_pre_hook(
                    MaskPreHook(self.context, owner), with_kwargs=True))

    def wire_layer(self, layer_name: str, layer: nn.Module,
                   adapted: list[tuple[str, MoALinear]]) -> None:
        """Give decoder layer `layer_name` its router over the experts of `adapted` (its
        MoALinear layers) and the parallel adapter and prompt expert the config asks for."""
        config = self.config
        family = family_of(layer)
        model_config = getattr(self.model, "config", None)
        if hasattr(model_config, "get_text_config"):  # composite (e.g. vision-language) models
            model_config = model_config.get_text_config()
        hidden = getattr(model_config, "hidden_size", None)
        if hidden is None:
            raise ValueError("router_scope='layer' needs model.config.hidden_size (or the "
                             "text config's, for a composite model)")
        names, slices, groups = [], [], []
        for name, module in adapted:
            relative = name[len(layer_name) + 1:]
            slices.append((len(names), len(names) + module.num_experts, name, module))
            names += [f"{relative}:{e}" for e in expert_names(module)]
            groups += [MODULE_GROUP] * module.num_experts
        mlp = getattr(layer, family.mlp, None)
        attention = getattr(layer, family.attention, None)
        adapter_index = prompt_index = None
        if config.parallel_adapter is not None:
            if not isinstance(mlp, nn.Module):
                raise ValueError(f"the parallel adapter sits beside the MLP, but {layer_name!r}"
                                 f" ({type(layer).__name__}) has no `{family.mlp}` module")
            adapter_index = len(names)
            names.append(f"parallel_adapter:adapter:{config.parallel_adapter}:"
                         f"{config.parallel_adapter_activation}")
            groups.append(PARALLEL_ADAPTER_GROUP)
        if config.prompt_length is not None:
            if attention is None:
                raise ValueError(f"the prompt expert sits in attention, but {layer_name!r} "
                                 f"({type(layer).__name__}) has no `{family.attention}` module")
            check_prompt_attention(family, attention, f"{layer_name}.{family.attention}")
            prompt_index = len(names)
            names.append(f"prompt:{config.prompt_length}")
            groups.append(PROMPT_GROUP)
        if not names:
            return
        input_norm = getattr(layer, family.input_norm)
        factory = _factory(input_norm if any(True for _ in input_norm.parameters()) else layer,
                           config.adapter_dtype)
        if config.adapter_dtype == "base" and adapted:  # the adapted linears' compute dtype
            factory["dtype"] = adapted[0][1].shrink_weight.dtype
        router = LayerRouter(hidden, names, config.router, self.collector,
                             scope="instance" if config.router_scope == "instance" else "layer",
                             groups=groups, context=self.context, **factory)
        self.add(layer, "moa_router", router)
        if config.router_scope == "instance":
            self.hooks.append(input_norm.register_forward_pre_hook(
                RecomputeMaskHook(self.context, layer)))
        if config.router_input == "residual":
            self.hooks.append(input_norm.register_forward_pre_hook(router.residual_hook))
        else:
            self.hooks.append(input_norm.register_forward_hook(router.input_norm_hook))
        router.split_for([(start, stop) for start, stop, _, _ in slices] +
                         [(index, index + 1) for index in (adapter_index, prompt_index)
                          if index is not None])
        for start, stop, name, module in slices:
            module.gate_source = LayerGates(router, start, stop, name)
        if config.router_input == "input_norm" and config.router_scope == "layer" and \
                attention is not None:
            readers = [getattr(attention, family.query or "", None),
                       getattr(attention, family.key, None), getattr(attention, family.value, None)]
            router.share_shrinks_with([(start, module) for start, _, _, module in slices
                                       if any(module is reader for reader in readers)])
        if adapter_index is not None:
            adapter = ParallelAdapter(hidden, hidden, config.parallel_adapter,
                                      config.parallel_adapter_activation, config.dropout,
                                      **factory)
            self.add(layer, "moa_parallel_adapter", adapter)
            self.hooks.append(mlp.register_forward_hook(
                adapter.mlp_hook(router, adapter_index, f"parallel adapter of {layer_name}"),
                with_kwargs=True))
            for norm_name in MLP_INPUT_NORMS:
                norm = getattr(layer, norm_name, None)
                if isinstance(norm, nn.Module) and is_pure_norm(norm):
                    self.hooks.append(norm.register_forward_hook(NormRecordHook(adapter),
                                                                 with_kwargs=True))
        if prompt_index is not None:
            prompt = PromptExpert(attention, config.prompt_length, hidden, **factory)
            self.add(attention, "moa_prompt", prompt)
            self.hooks += attach_prompt(attention, prompt, router, prompt_index,
                                        f"{layer_name}.{family.attention}", family)

    def add(self, owner: nn.Module, attribute: str, module: nn.Module) -> None:
        """Set `owner.attribute = module`, recorded for `remove`."""
        setattr(owner, attribute, module)
        self.added.append((owner, attribute))

    def remove(self) -> None:
        """Take every hook, MoALinear and layer expert out again (the targets' nn.Linear
        modules back in their places). Idempotent."""
        for hook in self.hooks:
            hook.remove()
        for parent, child, module, base in self.swaps:
            module.gate_source = None  # no longer read from a layer router
            setattr(parent, child, base)
        for owner, attribute in self.added:
            delattr(owner, attribute)
        self.hooks, self.swaps, self.added = [], [], []


__all__ = ["MOA_MODULES", "Injection", "check_not_offloaded", "find_decoder_layers", "find_targets"]
