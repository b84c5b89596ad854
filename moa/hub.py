"""The Hugging Face Hub: `resolve_adapter` turns a repo id into a directory of
huggingface_hub's cache (or finds it there, offline); `upload_adapter` uploads an adapter
directory's two files (moa_config.json and adapter_model.safetensors), nothing else.
moa.serialization saves and loads through these (MoAModel.from_pretrained, push_to_hub).
"""

from __future__ import annotations

import os

from moa.config import CONFIG_NAME, WEIGHTS_NAME
from moa.distributed import is_main


def resolve_adapter(source: str | os.PathLike, *, revision: str | None = None,
                    token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                    local_files_only: bool = False) -> str:
    """The local directory holding the adapter `source` names: a directory, or a Hub repo id
    ("user/repo") whose moa_config.json and adapter_model.safetensors huggingface_hub fetches
    at `revision` (a branch, tag or commit; None: the default branch) into its cache, or
    finds there: with HF_HUB_OFFLINE=1 or local_files_only=True only the cache is read, and
    without a connection huggingface_hub falls back to it. Both files come from one commit.

    Raises FileNotFoundError when `source` is neither a directory holding an adapter nor a
    repo (or revision) that holds one, naming what was tried.
    """
    path = os.fspath(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path!r}")
        if revision is not None:
            raise ValueError(f"revision={revision!r} names a commit of a Hub repo, but "
                             f"{path!r} is a local directory")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"{path!r} is neither a directory nor a Hugging Face Hub "
                                f"repo id (user/repo)") from None
    where = (f"{path!r} (no local directory of that name; tried it as a Hugging Face Hub "
             f"repo id{f' at revision {revision!r}' if revision else ''})")
    options = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
    try:
        config_path = hf_hub_download(path, CONFIG_NAME, revision=revision, **options)
        # snapshots/<commit>/moa_config.json: the weights from the same commit, even if the
        # branch moves between the two downloads
        commit = os.path.basename(os.path.dirname(config_path))
        weights_path = hf_hub_download(path, WEIGHTS_NAME, revision=commit, **options)
    except OSError as error:  # huggingface_hub's errors are OSErrors
        offline = ""
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE or local_files_only:
            offline = (" (offline: HF_HUB_OFFLINE=1 or local_files_only=True reads the local "
                       "cache only, which does not hold it)")
        raise FileNotFoundError(f"cannot load a MoA adapter from {where}{offline}: "
                                f"{type(error).__name__}: {error}") from error
    if os.path.dirname(config_path) != os.path.dirname(weights_path):
        raise FileNotFoundError(f"{where}: {CONFIG_NAME} and {WEIGHTS_NAME} resolved to "
                                f"different snapshots")
    return os.path.dirname(config_path)



def upload_adapter(directory: str | os.PathLike, repo_id: str, *,
                   commit_message: str | None = None, private: bool | None = None,
                   token: str | bool | None = None, revision: str | None = None,
                   create_pr: bool = False) -> object:
    """Upload moa_config.json and adapter_model.safetensors of the adapter saved in
    `directory`, nothing else, to `repo_id` (created if needed), from the main process.
    Returns huggingface_hub's CommitInfo on the main process, None elsewhere."""
    if not is_main():
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(directory),
                             allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
                             commit_message=commit_message or "Upload MoA adapter",
                             revision=revision, create_pr=create_pr)


__all__ = ["resolve_adapter", "upload_adapter"]
