"""The Hugging Face Hub and PEFT's adapter methods: a Hub id loads from huggingface_hub's
cache offline (the test fills a cache in a temporary HF_HOME; this machine has no network),
push_to_hub uploads the adapter files only (HfApi replaced by a recorder), and the
adapter-management methods that attribute forwarding would hand to the base model are
MoAModel's own or refused."""

from __future__ import annotations

import os
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from moa import MoAConfig, MoAModel, get_moa_model
from moa.config import CONFIG_NAME
from moa.serialization import WEIGHTS_NAME
from tests.moa.tiny import perturb, tiny_llama, token_batch

REPO = "someone/tiny-moa"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def trained(seed: int) -> MoAModel:
    moa = get_moa_model(tiny_llama(), MoAConfig())
    perturb(moa, seed=seed)
    return moa.eval()


def logits_of(moa: MoAModel) -> torch.Tensor:
    with torch.no_grad():
        return moa.eval()(input_ids=token_batch(2, 9)).logits


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HOME with REPO cached at two revisions (main, tag v1), as huggingface_hub lays
    out what it downloads (refs/<revision> -> commit, snapshots/<commit>/<file>), and
    offline mode on. Returns the adapter of each revision."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    storage = cache / f"models--{REPO.replace('/', '--')}"
    adapters = {}
    for seed, (revision, commit) in enumerate(COMMITS.items(), start=3):
        adapters[revision] = trained(seed)
        snapshot = storage / "snapshots" / commit
        adapters[revision].save_pretrained(snapshot)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / revision).write_text(commit)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both when imported (here, long before this test): set them too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return adapters


def test_a_hub_id_loads_from_the_local_cache_offline(offline_cache):
    loaded = MoAModel.from_pretrained(tiny_llama(), REPO)
    assert torch.equal(logits_of(loaded), logits_of(offline_cache["main"]))
    tagged = MoAModel.from_pretrained(tiny_llama(), REPO, revision="v1")
    assert torch.equal(logits_of(tagged), logits_of(offline_cache["v1"]))
    by_commit = MoAModel.from_pretrained(tiny_llama(), REPO, revision=COMMITS["v1"])
    assert torch.equal(logits_of(by_commit), logits_of(offline_cache["v1"]))


def test_what_the_cache_lacks_offline_is_a_clear_error(offline_cache):
    base = tiny_llama()
    names = [name for name, _ in base.named_parameters()]
    with pytest.raises(FileNotFoundError, match=r"'someone/other'.*offline: HF_HUB_OFFLINE"):
        MoAModel.from_pretrained(base, "someone/other")
    with pytest.raises(FileNotFoundError, match=r"at revision 'v2'"):
        MoAModel.from_pretrained(base, REPO, revision="v2")
    with pytest.raises(FileNotFoundError, match=r"neither a directory nor a Hugging Face"):
        MoAModel.from_pretrained(base, "no/such/dir")
    assert [name for name, _ in base.named_parameters()] == names  # left as it was


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records each call and, for upload_folder, the
    files it would upload (what allow_patterns lets through) with their bytes."""

    calls: list = []

    def __init__(self, token=None, **_):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        names = sorted(os.listdir(folder_path))
        chosen = list(filter_repo_objects(names, allow_patterns=allow_patterns))
        files = {name: open(os.path.join(folder_path, name), "rb").read() for name in chosen}
        self.calls.append(("upload_folder", repo_id, {"files": files, **kwargs}))
        return "commit-info"


@pytest.fixture
def recording_api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi.calls


def test_push_to_hub_uploads_the_adapter_files_only(recording_api, tmp_path):
    moa = trained(3)
    assert moa.push_to_hub("someone/pushed", commit_message="first", private=True) == \
        "commit-info"
    (create, repo, options), (upload, upload_repo, uploaded) = recording_api
    assert (create, repo, options["private"]) == ("create_repo", "someone/pushed", True)
    assert (upload, upload_repo, uploaded["commit_message"]) == \
        ("upload_folder", "someone/pushed", "first")
    assert set(uploaded["files"]) == {CONFIG_NAME, WEIGHTS_NAME}
    # the adapter, not the base model: its bytes are the MoA tensors' (and the metadata)
    moa_bytes = sum(p.numel() * p.element_size() for _, p in moa.moa_named_parameters())
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
    assert len(uploaded["files"][WEIGHTS_NAME]) < moa_bytes + 64 * 1024 < base_bytes
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, data in uploaded["files"].items():
        (pushed / name).write_bytes(data)
    assert torch.equal(logits_of(MoAModel.from_pretrained(tiny_llama(), pushed)),
                       logits_of(moa))


def test_save_pretrained_with_push_to_hub_leaves_other_files_local(recording_api, tmp_path):
    directory = tmp_path / "my-adapter"
    directory.mkdir()
    (directory / "README.md").write_text("notes")
    (directory / "model.safetensors").write_bytes(b"a base model's weights")
    trained(3).save_pretrained(directory, push_to_hub=True, revision="dev")
    (_, repo, _), (_, _, uploaded) = recording_api
    assert repo == "my-adapter"  # the directory's name, as transformers does
    assert set(uploaded["files"]) == {CONFIG_NAME, WEIGHTS_NAME}
    assert uploaded["revision"] == "dev"


def test_peft_keywords_of_save_pretrained(tmp_path):
    moa = trained(3)
    with pytest.raises(ValueError, match="safetensors only"):
        moa.save_pretrained(tmp_path / "a", safe_serialization=False)
    with pytest.raises(TypeError, match="max_shard_size"):
        moa.save_pretrained(tmp_path / "a", max_shard_size="1GB")
    with pytest.raises(ValueError, match="one adapter, named 'default'"):
        moa.save_pretrained(tmp_path / "a", selected_adapters=["other"])
    moa.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()
    # a state dict of the MoAModel (as the Trainer passes it): its MoA tensors are written
    state = {name: tensor + 1 for name, tensor in moa.state_dict().items()}
    moa.save_pretrained(tmp_path / "from-state", state_dict=state, safe_serialization=True,
                        selected_adapters=["default"])
    reloaded = MoAModel.from_pretrained(tiny_llama(), tmp_path / "from-state")
    for name, tensor in reloaded.moa_state_dict().items():
        assert torch.equal(tensor, state[f"model.{name}"]), name
    with pytest.raises(ValueError, match="lacks MoA tensors"):
        moa.save_pretrained(tmp_path / "partial", state_dict={"model.lm_head.weight": 0})


def test_adapter_methods_act_on_the_moa_adapter_or_are_refused(tmp_path):
    moa = trained(3)
    assert moa.active_adapters == ["default"] and moa.active_adapter == "default"
    moa.set_adapter("default")
    with pytest.raises(ValueError, match="one adapter, named 'default'"):
        moa.set_adapter("other")
    for method in ("add_adapter", "delete_adapter"):
        with pytest.raises(NotImplementedError, match="one MoA adapter"):
            getattr(moa, method)("other")
    with pytest.raises(NotImplementedError, match="disable_adapters"):
        moa.enable_adapters()
    # a PEFT-integration method the base model has and MoAModel does not define
    assert hasattr(moa.model, "enable_peft_hotswap")
    with pytest.raises(AttributeError, match="MoAModel does not support 'enable_peft_hotswap'"):
        moa.enable_peft_hotswap()  # the attribute lookup raises
    # load_adapter: another adapter of the same configuration, into this model
    other = trained(4)
    other.save_pretrained(tmp_path / "other")
    moa.load_adapter(tmp_path / "other", is_trainable=False)
    assert torch.equal(logits_of(moa), logits_of(other))
    assert not any(p.requires_grad for _, p in moa.moa_named_parameters())
    assert set(moa.get_adapter_state_dict()) == set(other.moa_state_dict())
    shutil.rmtree(tmp_path / "other")
    get_moa_model(tiny_llama(), MoAConfig(prompt_length=None)).save_pretrained(
        tmp_path / "other")
    with pytest.raises(ValueError, match=r"another configuration .* prompt_length"):
        moa.load_adapter(tmp_path / "other")
