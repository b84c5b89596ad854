"""Adapters saved by earlier code load into today's and compute what they computed then.

tests/moa/fixtures/saved_adapters/ holds, for every preset with a parallel adapter or a
prompt expert, an adapter saved on 2026-12-06 by the code before the layer-level experts
became wrapper modules (commit 1fb4b92; fixtures/make_saved_adapters.py wrote them) and
what that code computed with it. The saved tensors' names, their metadata (the config and
each module's expert signature) and the outputs must stay as they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moa import MoAModel
from moa.model import WEIGHTS_NAME
from tests.moa.fixtures.make_saved_adapters import PRESETS, expected_outputs
from tests.moa.tiny import tiny_llama, token_batch

SAVED = Path(__file__).resolve().parent / "fixtures" / "saved_adapters"


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("preset", PRESETS)  # each preset with a layer-level expert
def test_an_adapter_saved_by_the_earlier_code_loads_with_the_same_outputs(preset):
    directory = SAVED / preset
    moa = MoAModel.from_pretrained(tiny_llama(), directory)
    expected = load_file(str(directory / "expected.safetensors"))
    got = expected_outputs(moa)
    with torch.no_grad():
        base = tiny_llama()(token_batch()).logits
    # the adapter moves the logits well beyond the tolerance (else the check is empty)
    assert (expected["logits"] - base).abs().amax() > 1e-2
    for name in ("logits", "grad_logits"):
        torch.testing.assert_close(got[name], expected[name], msg=f"{preset}: {name}")
    assert torch.equal(got["generated"], expected["generated"])


@pytest.mark.parametrize("preset", PRESETS)  # each preset with a layer-level expert
def test_saving_again_writes_the_same_names_metadata_and_tensors(preset, tmp_path):
    directory = SAVED / preset
    moa = MoAModel.from_pretrained(tiny_llama(), directory)
    moa.save_pretrained(tmp_path)
    before, after = directory / WEIGHTS_NAME, tmp_path / WEIGHTS_NAME
    assert _metadata(after) == _metadata(before)
    old, new = load_file(str(before)), load_file(str(after))
    assert sorted(new) == sorted(old)
    assert any(".moa_prompt." in name for name in old) == (preset != "sparse_moa")
    assert any(".moa_parallel_adapter." in name for name in old)
    for name, tensor in old.items():
        assert torch.equal(new[name], tensor), name
