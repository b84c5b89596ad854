"""No host-device synchronisation in a training or decoding step of any preset, on the
paths an accelerator takes.

A sync (reading device data on the host: `nonzero`, `.item()`, `torch.equal`, a boolean
mask's selection, `.tolist()`, a tensor made from host data) stalls a GPU's queue at every
layer. The decisions that depend on the device (`moa_kernels.torch_ops.host_reads_are_free`)
are taken as on an accelerator inside `accelerator_decisions()`, so the CPU runs the
accelerator's paths here. Every aten op of the step is recorded (a TorchDispatchMode);
an op counts against MoA when it runs in a backward (no backward op of the frozen model
syncs) or when the innermost Python frame that called it outside torch is MoA's own
(moa/, moa_kernels/): transformers' own syncs (its padding-mask checks, its cache's
scalars) are not ours to remove.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moa import MoAConfig, get_moa_model
from moa.config import PRESETS
from moa.modules.layer_router import instance_gate_reuse
from moa.modules.prompt import prompt_key_cache
from moa_kernels import torch_ops
from tests.moa.tiny import cache_keyword, tiny_llama, token_batch

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[2]
MOA_PACKAGES = (ROOT / "moa", ROOT / "moa_kernels")

# ops whose result is read on the host (or whose output size is), and host data sent over
SYNCING_OPS = {aten.nonzero.default, aten._local_scalar_dense.default, aten.equal.default,
               aten.masked_select.default, aten.is_nonzero.default, aten.lift_fresh.default,
               aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
               aten.bincount.default, aten.allclose.default}


def _boolean_indices(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def syncs(func, args) -> bool:
    """Whether this aten call reads device data on the host (on an accelerator)."""
    if func in SYNCING_OPS:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default):
        return _boolean_indices(args)  # a boolean index is a nonzero
    if func is aten.repeat_interleave.Tensor:  # output size from the data
        return True
    return False


def _ours(stack: list[traceback.FrameSummary]) -> bool:
    """Whether the innermost frame outside torch is in moa/ or moa_kernels/."""
    for frame in reversed(stack):
        path = Path(frame.filename).resolve()
        if "torch" in path.parts and "site-packages" in path.parts:
            continue
        return any(package in path.parents for package in MOA_PACKAGES)
    return False


class SyncRecorder(TorchDispatchMode):
    """Records MoA's syncing ops (see the module docstring) with where they ran."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if syncs(func, args):
            node = torch._C._current_autograd_node()
            stack = traceback.extract_stack()[:-1]
            if node is not None or _ours(stack):
                where = type(node).__name__ if node is not None else " < ".join(
                    f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stack[-4:]))
                self.found.append(f"{func} ({where})")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        # .tolist() on a CPU tensor reaches no aten op: record it by hand
        self._tolist = torch.Tensor.tolist
        recorder = self

        def tolist(tensor):
            if _ours(traceback.extract_stack()[:-1]):
                recorder.found.append("Tensor.tolist")
            return recorder._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _model(preset: str):
    overrides = {} if PRESETS[preset].get("router", True) is None else {"aux_loss_coef": 0.1}
    return get_moa_model(tiny_llama(), MoAConfig.preset(preset, **overrides))


def _training_syncs(moa) -> list[str]:
    moa.train()
    ids = token_batch(2, 9)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: the load-balancing loss leaves it out
    moa(ids, attention_mask=mask, labels=ids).loss.backward()  # first-call caches filled
    recorder = SyncRecorder()
    with recorder:
        moa(ids, attention_mask=mask, labels=ids).loss.backward()
    return recorder.found


def _decoding_syncs(moa) -> list[str]:
    moa.eval()
    ids = token_batch(2, 9)
    with torch.no_grad(), prompt_key_cache(moa.model), \
            instance_gate_reuse(moa.model, moa._injection.context):
        key = cache_keyword(moa)
        cache = getattr(moa(ids, use_cache=True), key)
        cache = getattr(moa(ids[:, -1:], **{key: cache}, use_cache=True), key)
        recorder = SyncRecorder()
        with recorder:
            moa(ids[:, -1:], **{key: cache}, use_cache=True)
    return recorder.found


@pytest.fixture
def plan_on_every_call(monkeypatch):
    """The torch backend's CPU decision plans the sparse modes from 256 tokens on; here from
    one, so that the tiny batch would take the planned (syncing) path on the CPU."""
    monkeypatch.setattr(torch_ops, "SPARSE_PLAN_MIN_TOKENS", 1)


@pytest.mark.parametrize("preset", list(PRESETS))  # every preset: its routers and experts
def test_no_host_sync_in_a_training_or_decoding_step(preset, plan_on_every_call):
    torch.manual_seed(0)
    moa = _model(preset)
    with torch_ops.accelerator_decisions():
        assert _training_syncs(moa) == []
        assert _decoding_syncs(moa) == []


@pytest.mark.parametrize("preset", ["sparse_moa", "soft_moa"])
def test_the_recorder_sees_the_cpu_decisions_sync(preset, plan_on_every_call):
    # the CPU's own decisions do read data on the host (cheaply there): the routing plan of
    # the sparse modes, the padding mask's selection for the load-balancing loss. The
    # recorder must see them, or the test above could not fail.
    torch.manual_seed(0)
    found = _training_syncs(_model(preset))
    expected = "aten.nonzero.default" if preset == "sparse_moa" else "aten.index.Tensor"
    assert any(entry.startswith(expected) for entry in found), found


def test_the_recorder_sees_a_sync_in_a_backward():
    # a backward's sync has no Python frame of ours: it counts by running in a backward
    x = torch.randn(6, 3, requires_grad=True)
    recorder = SyncRecorder()
    with recorder:
        x[x[:, 0] > 0].sum().backward()
    assert any("IndexBackward0" in entry for entry in recorder.found), recorder.found
