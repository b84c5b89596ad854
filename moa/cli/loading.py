"""Base models and tokenizers for `moa train`, `moa evaluate` and `moa demo`.

A model path is one of:
- None: the embedded text model, a small Llama built from a config with a byte-level
  tokenizer (random frozen weights, no download): for trying the commands, not for results;
- a local transformers checkpoint directory (config.json, weights, tokenizer files);
- a .gguf file (transformers dequantizes it to fp32 with the `gguf` package), checked first
  so that a file that is not a model is one clear error, not a stack of parser messages.

Every failure to load is a ValueError (FileNotFoundError for a missing path) whose message
is one line naming the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moa.cli.tiny_models import TinyLlama, build_tiny_llama

# name_or_path recorded in the embedded model's config, and so in adapters trained on it
EMBEDDED_NAME = "moa-embedded-text-llama"
BYTE_TOKENS = 256
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EMBEDDED_SEED = 0
# The (tied) head's scale over the initializer's (moa/cli/tiny_models.py says why).
EMBEDDED_EMBEDDING_SCALE = 5.0


def is_gguf(path: str | os.PathLike | None) -> bool:
    """Whether `path` names a GGUF file (by its suffix)."""
    return path is not None and os.fspath(path).lower().endswith(".gguf")


def byte_tokenizer():
    """The embedded model's tokenizer: one token per byte (GPT-2's byte-to-character
    alphabet, no merges) plus an end-of-text token that also pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {character: index for index, character in enumerate(alphabet)}
    vocab[EOS_TOKEN] = BYTE_TOKENS
    vocab[PAD_TOKEN] = BYTE_TOKENS + 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                       use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=512)


def build_text_model(hidden_size: int = 64, num_layers: int = 2):
    """The embedded text model: a Llama (hidden 64, 2 layers, 4 query and 2 KV heads, tied
    embeddings like SmolLM2's) over byte_tokenizer()'s 258 tokens. Its weights are the same
    on every call (a fixed seed; the global RNG is left as it was), so an adapter trained on
    it loads into a later call's model."""
    spec = TinyLlama(vocab=BYTE_TOKENS + 2, hidden=hidden_size, intermediate=hidden_size * 3,
                     layers=num_layers, heads=4, kv_heads=2, max_positions=512, tied=True,
                     head_scale=EMBEDDED_EMBEDDING_SCALE, bos_token=None,
                     eos_token=BYTE_TOKENS, pad_token=BYTE_TOKENS + 1, name=EMBEDDED_NAME)
    with torch.random.fork_rng(devices=[]):
        return build_tiny_llama(spec, EMBEDDED_SEED)


def check_model_path(path: str | os.PathLike) -> Path:
    """`path` as a Path if it can be a model (a directory with config.json, or a .gguf file);
    otherwise FileNotFoundError or ValueError with a one-line reason."""
    path = Path(path)
    if is_gguf(path):
        if not path.exists():
            raise FileNotFoundError(f"no such GGUF file: {str(path)!r}")
        if not path.is_file():
            raise ValueError(f"{str(path)!r} is a directory, not a GGUF file")
        return path
    if not path.exists():
        raise FileNotFoundError(f"no such model: {str(path)!r} (give a transformers checkpoint "
                                "directory or a .gguf file)")
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is neither a transformers checkpoint directory nor a "
                         ".gguf file")
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a transformers checkpoint (no config.json in "
                         "it)")
    return path


def check_gguf(path: str | os.PathLike) -> str:
    """The architecture of the GGUF model at `path`, or a ValueError saying why it is not a
    model transformers can load (not GGUF, unreadable, an adapter or vocabulary-only file,
    no tensors, an architecture transformers does not convert)."""
    path = os.fspath(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        import gguf
    except ImportError:
        raise ValueError(f"loading {path!r} needs the gguf package: pip install gguf "
                         "(or pip install 'moa[smollm2]')") from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # the parser's errors are of many kinds; all mean "corrupt"
        raise ValueError(f"{path!r} is not a readable GGUF file: {type(error).__name__}: "
                         f"{_first_line(error)}") from None

    def field(name: str):
        value = reader.fields.get(name)
        return None if value is None else value.contents()

    kind = field("general.type")
    if kind is not None and kind != "model":
        raise ValueError(f"{path!r} is a GGUF {kind!r} file, not a model")
    architecture = field("general.architecture")
    if architecture is None:
        raise ValueError(f"{path!r} is a GGUF file without a model architecture "
                         "(no general.architecture), not a model")
    if not reader.tensors:
        raise ValueError(f"{path!r} is a GGUF file with no tensors: it holds no model weights")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path!r} is a GGUF {architecture!r} model, which transformers "
                         f"cannot load; it loads: {', '.join(GGUF_SUPPORTED_ARCHITECTURES)}")
    return architecture


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _from_pretrained_arguments(path: Path) -> tuple[str, dict]:
    if is_gguf(path):
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def load_base_model(path: str | os.PathLike | None, dtype: torch.dtype | None = None):
    """A fresh causal LM in eval mode: the embedded text model (path None), a checkpoint
    directory or a .gguf file, in `dtype` (None: as stored; GGUF: float32). A GGUF model's
    config records the file's path as its name_or_path, so an adapter names the file it was
    trained on."""
    if path is None:
        model = build_text_model()
        return model if dtype is None else model.to(dtype)
    path = check_model_path(path)
    if is_gguf(path):
        check_gguf(path)
    from transformers import AutoModelForCausalLM

    location, extra = _from_pretrained_arguments(path)
    if dtype is not None:
        extra["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **extra).eval()
    except Exception as error:  # corrupt weights, unknown architecture, ...: one clear line
        raise ValueError(f"cannot load the model {str(path)!r}: {type(error).__name__}: "
                         f"{_first_line(error)}") from error
    if is_gguf(path):
        model.config._name_or_path = str(path)
    return model


def load_tokenizer(path: str | os.PathLike | None):
    """The tokenizer of the model at `path` (None: the embedded byte-level one), with a
    padding token (the end-of-text token where the tokenizer has none)."""
    if path is None:
        return byte_tokenizer()
    path = check_model_path(path)
    if is_gguf(path):
        check_gguf(path)
    from transformers import AutoTokenizer

    location, extra = _from_pretrained_arguments(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    except Exception as error:
        raise ValueError(f"cannot load the tokenizer of {str(path)!r}: "
                         f"{type(error).__name__}: {_first_line(error)}") from error
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {str(path)!r} has no end-of-text token; moa "
                         "train and evaluate need one to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_description(path: str | os.PathLike | None) -> str:
    """How a model path reads in logs and results."""
    return "the embedded text model" if path is None else os.fspath(path)


__all__ = ["EMBEDDED_NAME", "build_text_model", "byte_tokenizer", "check_gguf",
           "check_model_path", "is_gguf", "load_base_model", "load_tokenizer",
           "model_description"]
