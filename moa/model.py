"""The wrapper: `get_moa_model` and `MoAModel`, as PEFT's PeftModel is to its tuners.

`get_moa_model(model, config)` freezes the model and injects MoA (moa/injection.py: each
targeted nn.Linear becomes a `MoALinear`; with router_scope="layer" the layer routers,
parallel adapters and prompt experts of moa/modules/ are added). The module tree keeps its
names (a MoALinear sits where its nn.Linear was, the frozen layer as its `.base`), so the
model's own forward, `generate` and gradient checkpointing run unchanged. MoAModel adds what
users call: parameters, forward with the load-balancing loss, disable_adapters, unload and
merging, router statistics, and saving and loading (moa/serialization.py).

Saved form (`save_pretrained`): `moa_config.json` (MoAConfig.to_dict) and
`adapter_model.safetensors` with the MoA tensors only, named as in the base model's
`named_parameters()` ("model.layers.0.self_attn.q_proj.shrink_weight",
"model.layers.0.moa_router.router.w1_weight", ...). Loading is strict: a missing, extra or
differently shaped tensor is an error that names it. moa/serialization.py writes both files
or neither and checks on loading that they belong together.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from moa.config import MoAConfig
from moa.distributed import TensorSlot, clean_name, gather_adapter_state
from moa.injection import MOA_MODULES, Injection, find_decoder_layers, find_targets
from moa.modules.aux_loss import GateCollector, load_balancing_loss
from moa.modules.dispatch import ORDINARY_TENSOR_TYPES
from moa.modules.layer_router import LayerRouter, instance_gate_reuse
from moa.modules.linear import MoALinear
from moa.modules.parallel_adapter import ParallelAdapter
from moa.modules.prompt import PromptExpert, prompt_key_cache
from moa.serialization import (
    WEIGHTS_NAME,
    load_adapter,
    load_adapter_into,
    load_state_into,
    push_adapter,
    save_adapter,
)
from moa.stats import format_router_stats, router_stats


def get_moa_model(model: nn.Module, config: MoAConfig | None = None) -> MoAModel:
    """Inject MoA into a transformers model (in place) and wrap it; see `MoAModel`."""
    return MoAModel(model, MoAConfig() if config is None else config)


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
        self._injection = Injection(model, self.moa_config, self._collector)
        self._requires_grad = [(param, param.requires_grad) for param in model.parameters()]
        self._enabled = True
        model.requires_grad_(False)
        self._slots: list[TensorSlot] = []
        try:
            self._injection.inject()
        except BaseException:
            self.unload()  # a failed injection leaves the model as it was
            raise
        # Where each MoA tensor lives, before any wrapper can rename or unregister it: what
        # save_pretrained reads (and gathers) on a wrapped or sharded model.
        self._slots = [TensorSlot(name, owner, attribute, tuple(param.shape))
                       for name, owner, attribute, param in self._moa_tensors()]
        # Which MoA tensors train (not the Sparse MoA thresholds, as published), for
        # load_adapter(is_trainable=True) after a load for inference froze them all.
        self._trains = {name: param.requires_grad for name, param in
                        self.moa_named_parameters()}
        self._frozen_for_inference = False

    @property
    def tensor_slots(self) -> list[TensorSlot]:
        """Where each MoA tensor lives (module, attribute, name, shape), as recorded at
        injection: what saving reads and gathers on a wrapped or sharded model (empty after
        unload())."""
        return self._slots

    # The Trainer's quantized-base check (transformers.trainer_utils.
    # validate_quantization_for_training) reads this flag as "trainable adapters are attached".
    _hf_peft_config_loaded: ClassVar[bool] = True

    # PEFT's and transformers' adapter-management methods, which attribute forwarding would
    # otherwise hand to the base model (acting on it, not on the MoA adapter): those that
    # MoAModel does not define are refused (see __getattr__).
    ADAPTER_METHODS: ClassVar[frozenset[str]] = frozenset({
        "load_adapter", "add_adapter", "set_adapter", "delete_adapter", "enable_adapters",
        "disable_adapters", "active_adapters", "active_adapter", "get_adapter_state_dict",
        "enable_peft_hotswap", "push_to_hub", "save_pretrained", "merge_adapter",
        "unmerge_adapter", "add_weighted_adapter", "set_adapters", "load_lora_adapter",
        "peft_config"})

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        try:
            found = getattr(self.model, name)
        except AttributeError:
            raise AttributeError(f"neither MoAModel nor its {type(self.model).__name__} has "
                                 f"an attribute {name!r}") from None
        if name in self.ADAPTER_METHODS:
            raise AttributeError(
                f"MoAModel does not support {name!r}: it holds one MoA adapter ('default'), "
                f"and forwarding {name!r} to the {type(self.model).__name__} inside would act "
                f"on the base model, not on the adapter. MoAModel has save_pretrained, "
                f"from_pretrained, load_adapter, push_to_hub, disable_adapters, unload and "
                f"merge_and_unload") from None
        return found

    # ---- taking MoA out -----------------------------------------------------------------

    def unload(self) -> nn.Module:
        """Take every MoA module and hook out again and give back the base model as it was
        before injection (frozen flags included). This MoAModel is empty afterwards."""
        self._injection.remove()
        for param, requires_grad in self._requires_grad:
            param.requires_grad_(requires_grad)
        self._requires_grad, self._slots = [], []
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
               for owner, attribute in self._injection.added):
            raise ValueError("the parallel adapter and the prompt expert cannot be merged "
                             "into weights; unload() gives the base model")
        for parent, child, layer, _ in self._injection.swaps:
            adapters = [str(s) for s in layer.specs if s.kind == "adapter"]
            if adapters:
                raise ValueError(f"{type(parent).__name__}.{child} has adapter experts "
                                 f"({', '.join(adapters)}), whose non-linearity cannot be "
                                 "merged into a weight")
        self._check_mergeable_weights()
        with torch.no_grad():
            for _, _, layer, base in self._injection.swaps:
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
        for _, _, layer, base in self._injection.swaps:
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
        named as in the base model's named_parameters() (free of the path parts wrappers
        such as FSDP1 insert). On a sharded model these are the local shards: save_pretrained
        and get_adapter_state_dict gather them whole."""
        for name, _, _, param in self._moa_tensors():
            yield name, param

    def _moa_tensors(self) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
        """(name, owning module, attribute, parameter) of every MoA tensor."""
        for name, module in self.model.named_modules():
            if isinstance(module, MOA_MODULES):
                for param_name, param in module.named_parameters():
                    if isinstance(module, MoALinear) and param_name.startswith("base."):
                        continue
                    owner, _, attribute = param_name.rpartition(".")
                    yield clean_name(f"{name}.{param_name}"), module.get_submodule(owner), \
                        attribute, param

    def moa_state_dict(self) -> dict[str, torch.Tensor]:
        """The MoA tensors by name (detached, live)."""
        return {name: param.detach() for name, param in self.moa_named_parameters()}

    def trainable_parameter_count(self) -> int:
        """Number of trainable elements (parameters with requires_grad)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def frozen_moa_parameter_count(self) -> int:
        """Number of elements of MoA tensors that do not train: the Sparse MoA thresholds
        (router mode "threshold" without learn_threshold: the published method never
        updates them), or every MoA tensor after from_pretrained(is_trainable=False). With
        trainable_parameter_count() it adds up to the published parameter count."""
        return sum(p.numel() for _, p in self.moa_named_parameters() if not p.requires_grad)

    def print_trainable_parameters(self) -> None:
        """Print "trainable params: N || all params: M || trainable%: P" as PEFT does, with
        frozen MoA tensors apart: "trainable params: N (+ F frozen thresholds) || ..."."""
        trainable = self.trainable_parameter_count()
        total = sum(p.numel() for p in self.model.parameters())
        percent = 100 * trainable / total if total else 0.0
        frozen = [(name, p.numel()) for name, p in self.moa_named_parameters()
                  if not p.requires_grad]
        apart = ""
        if frozen:
            what = "thresholds" if all(".threshold_" in name for name, _ in frozen) \
                else "MoA params"
            apart = f" (+ {sum(n for _, n in frozen):,d} frozen {what})"
        print(f"trainable params: {trainable:,d}{apart} || all params: {total:,d} || "
              f"trainable%: {percent:.4f}")

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the MoA modules in it), as PEFT names it."""
        return self.model

    # ---- running ------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        """The model's forward (its output, unchanged unless aux_loss_coef > 0, in which case
        aux_loss_coef * the mean, or with aux_loss_reduction "sum" the sum, of the
        load-balancing losses of all router calls is added to the loss)."""
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
            losses = torch.stack([load_balancing_loss(g) if isinstance(g, torch.Tensor)
                                  else load_balancing_loss(*g) for g in gates])
            aux = losses.sum() if self.moa_config.aux_loss_reduction == "sum" else \
                losses.mean()
            self.last_aux_loss = aux
            if isinstance(output, tuple):
                if labels is not None:
                    output = (output[0] + coef * aux.to(output[0].dtype), *output[1:])
            elif getattr(output, "loss", None) is not None:
                output.loss = output.loss + coef * aux.to(output.loss.dtype)
        return output

    def generate(self, *args, **kwargs):
        """The model's generate, adapters on (unless inside disable_adapters). The prompt
        experts' keys and values are computed once per call, not once per decoded token;
        instance routers compute their gates from the prompt and reuse them at every
        decoding step."""
        with prompt_key_cache(self.model), \
                instance_gate_reuse(self.model, self._injection.context):
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
                    module.gates = module.gate_parts = None
        self._enabled = enabled

    def router_stats(self) -> dict[str, dict]:
        """Per router: expert names, mean gate and fraction of tokens active in the last
        forward (see moa.stats.router_stats)."""
        return router_stats(self.model)

    def print_router_stats(self) -> None:
        """Print router_stats() as tables (see moa.stats.format_router_stats)."""
        print(format_router_stats(self.router_stats()))

    # ---- saving and loading -------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None,
                        safe_serialization: bool = True, is_main_process: bool | None = None,
                        selected_adapters: list[str] | None = None, push_to_hub: bool = False,
                        **push_kwargs) -> None:
        """Write moa_config.json and adapter_model.safetensors (MoA tensors only) into
        `save_directory`, both or neither: the previous adapter there stays loadable and
        unchanged if saving fails or is interrupted, and other files in it are left alone.
        The weights' metadata names the base model (its config's name_or_path), the moa
        version and the config and per-module experts they were saved with, which loading
        checks. Refused (RuntimeError) after unload(); see moa.serialization.

        Under data parallelism call it on every rank, as with PEFT: the MoA tensors are
        gathered whole from FSDP2 (DTensor), FSDP1 (each unit inside the model unsharded in
        turn) and DeepSpeed ZeRO-3 (GatheredParameters), read as they are under DDP and
        ZeRO-1/2, and written once, by the main process, under the names one process would
        use. The keywords are PEFT's and the Trainer's.

        Args:
            save_directory: where to write (created if needed).
            state_dict: a full state dict to take the MoA tensors from instead of the model
                (the model's, the base model's or a DDP/DeepSpeed engine's; see
                moa.serialization.adapter_state_from); other tensors in it are ignored.
            safe_serialization: must be True: adapters are safetensors only.
            is_main_process: whether this process writes; None: rank 0 of the default
                process group (or the only process).
            selected_adapters: None or ["default"] (a MoAModel holds one adapter).
            push_to_hub: also upload the adapter files (push_to_hub's keywords: repo_id,
                default the directory's name; commit_message, private, token, revision,
                create_pr).
        """
        if not safe_serialization:
            raise ValueError("MoA adapters are saved as safetensors only "
                             "(safe_serialization=False would mean pickle, which moa never "
                             "writes or reads); leave safe_serialization=True")
        self._check_adapter_names(selected_adapters or [], "selected_adapters")
        allowed = {"repo_id", "commit_message", "private", "token", "revision", "create_pr"}
        unknown = sorted(set(push_kwargs) - allowed) if push_to_hub else sorted(push_kwargs)
        if unknown:
            raise TypeError(f"save_pretrained got unexpected keyword arguments "
                            f"{', '.join(unknown)}" + (
                                "" if push_to_hub else
                                " (push_to_hub=True takes repo_id, commit_message, private, "
                                "token, revision and create_pr)"))
        save_adapter(self, save_directory, state_dict=state_dict,
                     is_main_process=is_main_process)
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", None) or \
                os.path.basename(os.path.normpath(os.fspath(save_directory)))
            push_adapter(self, repo_id, directory=save_directory, **push_kwargs)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None,
                    private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, create_pr: bool = False):
        """Upload the adapter (moa_config.json and adapter_model.safetensors, never the base
        model) to the Hugging Face Hub repo `repo_id`, created if needed. Call it on every
        rank of a sharded model (the tensors are gathered as for save_pretrained); the main
        process uploads. Returns huggingface_hub's CommitInfo there, None elsewhere."""
        return push_adapter(self, repo_id, commit_message=commit_message, private=private,
                            token=token, revision=revision, create_pr=create_pr)

    def load_moa_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` into the MoA tensors. Every MoA tensor must be present with its shape
        and nothing else may be; otherwise ValueError names the offending keys."""
        load_state_into(self, state)

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Whole CPU copies of the MoA tensors by name, as save_pretrained writes them
        (gathered from a sharded model: call it on every rank then)."""
        self._check_adapter_names([adapter_name], "adapter_name")
        return gather_adapter_state(self)[0]

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike,
                        is_trainable: bool = False, backend: str | None = None, *,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False) -> MoAModel:
        """Inject the saved configuration into `model` and load the saved MoA tensors. The
        weights must be the ones saved with moa_config.json (see moa.serialization); on
        any error the model is left as it was.

        Args:
            model: a fresh base model (the one the adapters were trained on). To train it
                sharded (FSDP, DeepSpeed), load first, then wrap.
            model_id: a directory save_pretrained wrote (a Trainer checkpoint of
                moa.trainer.MoATrainer is one), or a Hugging Face Hub repo id ("user/repo"),
                fetched into huggingface_hub's cache or found there (offline with
                HF_HUB_OFFLINE=1).
            is_trainable: False (the default, as PEFT's): for inference, every tensor
                frozen and the whole model in eval mode (dropout off: identical calls give
                identical outputs). True: the MoA tensors train; the modules' modes are left
                as loading leaves them (the base's own, the new MoA modules in training
                mode), as PEFT does: call .train() before training (the Trainer does).
            backend: run with this backend instead of the saved one (e.g. "torch" on a
                machine without a GPU for a config saved with "triton").
            revision, token, cache_dir, local_files_only: for a Hub id, as huggingface_hub
                takes them (revision: a branch, tag or commit).
        """
        return load_adapter(cls, model, model_id, is_trainable, backend, revision=revision,
                            token=token, cache_dir=cache_dir, local_files_only=local_files_only)

    # ---- PEFT's adapter management, for the one adapter a MoAModel holds ---------------

    @property
    def active_adapters(self) -> list[str]:
        """["default"]: a MoAModel holds one adapter (PEFT's property of the same name)."""
        return ["default"]

    @property
    def active_adapter(self) -> str:
        return "default"

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str = "default",
                     is_trainable: bool = True, *, revision: str | None = None,
                     token: str | bool | None = None, **_ignored) -> None:
        """Load the tensors of a saved adapter with this model's configuration (a checkpoint
        of the same training, a directory or a Hub id) into this model's MoA modules; what
        the Trainer calls on resuming. is_trainable=False freezes them and puts the model in
        eval mode (as PEFT's load_adapter does); is_trainable=True after such a load (or
        from_pretrained's) makes the MoA tensors that trained at injection train again and puts
        the MoA modules in training mode, as from_pretrained(is_trainable=True) leaves them. A
        different configuration is a ValueError:
        load that with from_pretrained into a fresh model."""
        self._check_adapter_names([adapter_name], "adapter_name")
        load_adapter_into(self, model_id, revision=revision, token=token)
        if not is_trainable:
            self.freeze_for_inference()
        elif self._frozen_for_inference:
            for name, param in self.moa_named_parameters():
                param.requires_grad_(self._trains.get(name, True))
            self._frozen_for_inference = False
            for module in self.model.modules():  # the modes a trainable load leaves
                if isinstance(module, MOA_MODULES):
                    module.train()

    def freeze_for_inference(self) -> None:
        """Freeze every MoA tensor and put the model in eval mode, as a load for inference
        does (from_pretrained and load_adapter with is_trainable=False); a later
        load_adapter(is_trainable=True) gives back the tensors that trained and train mode."""
        for _, param in self.moa_named_parameters():
            param.requires_grad_(False)
        self._frozen_for_inference = True
        self.eval()

    def set_adapter(self, adapter_name: str) -> None:
        """Accepts "default", the one adapter (already active); other names are an error."""
        self._check_adapter_names([adapter_name], "adapter_name")

    def add_adapter(self, *args, **kwargs):
        """Refused: a MoAModel holds one MoA adapter."""
        raise NotImplementedError(
            "a MoAModel holds one MoA adapter ('default'); to train another, inject into a "
            "fresh base model with get_moa_model (or unload() this one first)")

    def delete_adapter(self, *args, **kwargs):
        """Refused: the one adapter comes out with unload()."""
        raise NotImplementedError("a MoAModel holds one MoA adapter; unload() takes it out "
                                  "and gives back the base model")

    def enable_adapters(self) -> None:
        """Refused: adapters are on except inside `with moa.disable_adapters():`."""
        raise NotImplementedError("MoA adapters are on except inside `with "
                                  "moa_model.disable_adapters():`, which switches them back "
                                  "on when it ends")

    def _check_adapter_names(self, names: list[str], what: str) -> None:
        others = [name for name in names if name != "default"]
        if others:
            raise ValueError(f"{what}={others if len(names) > 1 else others[0]!r}: a MoAModel "
                             f"holds one adapter, named 'default'")


__all__ = ["MOA_MODULES", "MoAModel", "WEIGHTS_NAME", "find_decoder_layers", "find_targets",
           "get_moa_model"]
