"""The options of every `moa` subcommand, one system: a table of Option per command, from
which come its flags (add_options), the keys of its --config file (read_config_file), its
defaults, and the dataclass it runs with (options_dataclass).

An Option's `convert` checks a value, from a flag's text or from a config file, and raises
argparse.ArgumentTypeError saying what was wrong and what is allowed. One convention for
devices: cpu, cuda (the first GPU) or cuda:N (a GPU that exists), and auto (a CUDA GPU when
there is one) where a command can pick for itself (`device`; `torch_device` without auto).
A flag's parsed value is None when it is not given, so that the --config file's value
shows through; merge_options lays the flags over the file over the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moa.config import BACKENDS, PRESETS

# ---------------------------------------------------------------------------------------
# validators: a flag's text or a config file's value -> the value, or ArgumentTypeError
# ---------------------------------------------------------------------------------------


def _integer(value, low: int, what: str, range_what: str | None = None) -> int:
    """value as an int in [low, 2**63); `what` names the kind expected, `range_what` (when
    given) the range, for a value that is an integer but outside it."""
    if isinstance(value, bool) or isinstance(value, float):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if number < low or number >= 2**63:
        raise argparse.ArgumentTypeError(f"expected {range_what or what}, got {value!r}")
    return number


def positive_int(value) -> int:
    """An integer >= 1, from a flag's text or a config value."""
    return _integer(value, 1, "a positive integer")


def count(value) -> int:
    """An integer >= 0."""
    return _integer(value, 0, "an integer >= 0")


def seed(value) -> int:
    """An integer seed in [0, 2**63)."""
    return _integer(value, 0, "an integer seed", "a seed in [0, 2**63)")


def _real(value, what: str, allow_zero: bool) -> float:
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def positive_float(value) -> float:
    """A finite number > 0."""
    return _real(value, "a number > 0", allow_zero=False)


def nonnegative_float(value) -> float:
    """A finite number >= 0."""
    return _real(value, "a number >= 0", allow_zero=True)


def text(value) -> str:
    """A non-empty string (a path)."""
    if not isinstance(value, str) or not value:
        raise argparse.ArgumentTypeError(f"expected a path or name, got {value!r}")
    return value


def flag(value) -> bool:
    """A boolean (config files: true or false)."""
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value


def torch_device(value, allow_auto: bool = False) -> str:
    """A device name the `moa` commands take: cpu, cuda (the first GPU) or cuda:N (the GPU of
    index N, which must exist), and with allow_auto also auto (a CUDA GPU when there is
    one)."""
    value = text(value)
    if allow_auto and value == "auto":
        return value
    allowed = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
    try:
        parsed = torch.device(value)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; use {allowed}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {value!r}; use {allowed}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"--device {value} given but no CUDA GPU is "
                                             "available")
        gpus = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= gpus:
            raise argparse.ArgumentTypeError(f"--device {value}: there is no GPU "
                                             f"{parsed.index}; this machine has {gpus} "
                                             f"(cuda:0 to cuda:{gpus - 1})")
    return value


def device(value) -> str:
    """auto (a CUDA GPU when there is one), cpu, cuda or cuda:N."""
    return torch_device(value, allow_auto=True)


def resolve_device(name: str) -> torch.device:
    """The torch device a checked device name means: auto is the first CUDA GPU when there
    is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _one_of(what: str, allowed) -> Callable[[object], str]:
    def check(value) -> str:
        value = text(value)
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; allowed: "
                                             f"{', '.join(allowed)}")
        return value

    check.__doc__ = f"A {what} name, one of: {', '.join(allowed)}."
    return check


preset = _one_of("preset", PRESETS)
backend = _one_of("backend", BACKENDS)


def checkpoint_path(value) -> str:
    """A model path that must exist when the flag is read: a .gguf file, or a transformers
    checkpoint directory (with its config.json)."""
    value = text(value)
    path = Path(value)
    if value.lower().endswith(".gguf"):
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"--model {value!r}: no such GGUF file")
        return value
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"--model {value!r} is not a directory (nor a .gguf "
                                         "file)")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"--model {value!r} is not a transformers checkpoint (no config.json in it)")
    return value


# ---------------------------------------------------------------------------------------
# the table: flags, config files, defaults and the options' dataclass
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One option: a flag --NAME (dashes) and a config key NAME (dashes or underscores).

    convert checks a value (a validator above); choices, when given, are the values allowed
    after it (a flag's error and help are then argparse's own: "invalid choice")."""

    name: str
    convert: Callable
    default: object
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value):
        """value converted, and one of the choices where there are choices."""
        value = self.convert(value)
        if self.choices is not None and value not in self.choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r}; allowed: "
                                             f"{', '.join(self.choices)}")
        return value


def add_options(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    """Add each option as a flag whose parsed default is None (so that a --config file's
    value shows through where the flag is not given); the help states the real default."""
    for option in options:
        help_text = option.help if option.default is None else \
            f"{option.help} (default: {option.default})"
        if option.convert is flag:
            parser.add_argument(option.flag, dest=option.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(option.flag, dest=option.name, default=None,
                                type=option.convert, choices=option.choices,
                                metavar=option.metavar, help=help_text)


def _annotation(option: Option) -> str:
    """The type its dataclass field is annotated with: what option.convert returns."""
    returns = getattr(option.convert, "__annotations__", {}).get("return", "object")
    name = returns if isinstance(returns, str) else getattr(returns, "__name__", "object")
    return name if option.default is not None else f"{name} | None"


def options_dataclass(options: tuple[Option, ...], **inputs: object):
    """Class decorator: the class becomes a keyword-only dataclass whose fields are the
    options' names and defaults, in the table's order, then `inputs` (name=default: what a
    command reads besides its options, e.g. config, the --config file). The class keeps its
    own methods (checks in __post_init__, a from_args of its own); it gets OPTIONS, the
    table, and unless it defines one, from_args(args): the options of parsed flags."""
    defaults = {option.name: option.default for option in options}
    annotations = {option.name: _annotation(option) for option in options}
    for name, default in inputs.items():
        if name in defaults:
            raise ValueError(f"{name!r} is an option and an input")
        defaults[name], annotations[name] = default, "object"

    def decorate(cls: type) -> type:
        clashes = [name for name in defaults if name in vars(cls)]
        if clashes:
            raise TypeError(f"{cls.__name__} defines {clashes}, which its options define")
        cls.__annotations__ = annotations
        for name, default in defaults.items():
            setattr(cls, name, default)
        cls.OPTIONS = options
        if "from_args" not in vars(cls):
            cls.from_args = classmethod(_from_args)
        return dataclasses.dataclass(kw_only=True)(cls)

    return decorate


def _from_args(cls, args: argparse.Namespace):
    """The options of parsed flags (with their --config file, where the command has one)."""
    return cls(**merge_options(args, cls.OPTIONS))


# ---------------------------------------------------------------------------------------
# config files and merging
# ---------------------------------------------------------------------------------------

class _RepeatedKey(ValueError):
    """A config file names the same key twice."""


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict, refusing a key given twice (json keeps the last)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _RepeatedKey(f"the key {key!r} is given twice")
        result[key] = value
    return result


def _yaml_without_repeated_keys(raw: str):
    """yaml.safe_load, refusing a mapping key given twice (PyYAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise _RepeatedKey(f"the key {key!r} is given twice (line "
                                       f"{key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(raw, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_config_file(path: str | os.PathLike, options: tuple[Option, ...]) -> dict:
    """The option values in a JSON or YAML file (an object whose keys are option names, as
    the flags without the leading dashes; dashes or underscores), each checked as its flag
    would be. An option given twice (the same key twice, or under both spellings) is a
    ValueError naming both."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--config {str(path)!r} is a folder; give a JSON or YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {str(path)!r}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = _yaml_without_repeated_keys(raw)
        except _RepeatedKey as error:
            raise ValueError(f"{path}: {error}; give each option once") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: "
                             f"{str(error).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(raw, object_pairs_hook=_unique_pairs)
        except _RepeatedKey as error:
            raise ValueError(f"{path}: {error}; give each option once") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); use a .yaml or .yml name "
                             "for YAML") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold an object of options, not a "
                         f"{type(data).__name__}")
    by_name = {o.name: o for o in options}
    values = {}
    keys = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            raise ValueError(f"{path}: unknown option {key!r}; allowed: "
                             f"{', '.join(o.name.replace('_', '-') for o in options)}")
        if name in keys:
            raise ValueError(f"{path}: {keys[name]!r} and {key!r} are the same option; give "
                             "it once")
        keys[name] = key
        if value is None:
            values[name] = None
            continue
        try:
            values[name] = by_name[name].check(value)
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{path}: {key}: {error}") from None
    return values


def merge_options_with_sources(args: argparse.Namespace, options: tuple[Option, ...]
                               ) -> tuple[dict, dict]:
    """merge_options, and where each value not left at its default came from: {name:
    "--flag" or "the --config file PATH"}."""
    values = {o.name: o.default for o in options}
    sources = {}
    if getattr(args, "config", None):
        from_file = read_config_file(args.config, options)
        values.update(from_file)
        sources.update({name: f"the --config file {args.config}" for name, value
                        in from_file.items() if value is not None})
    for option in options:
        if getattr(args, option.name, None) is not None:
            values[option.name] = getattr(args, option.name)
            sources[option.name] = option.flag
    return values, sources


def merge_options(args: argparse.Namespace, options: tuple[Option, ...]) -> dict:
    """Defaults, overridden by the --config file's values, overridden by the flags given."""
    return merge_options_with_sources(args, options)[0]


__all__ = ["Option", "add_options", "backend", "checkpoint_path", "count", "device", "flag",
           "merge_options", "merge_options_with_sources", "nonnegative_float",
           "options_dataclass", "positive_float", "positive_int", "preset", "read_config_file",
           "resolve_device", "seed", "text", "torch_device"]
