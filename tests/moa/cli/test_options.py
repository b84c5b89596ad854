"""moa/cli/options.py: one options system for every subcommand (the tables, the dataclasses
derived from them, the validators' conventions, config files)."""

import argparse
import dataclasses

import pytest

from moa.cli.bench import BENCH_OPTIONS, BenchOptions
from moa.cli.check import CHECK_OPTIONS, CheckOptions
from moa.cli.compare_options import COMPARE_OPTIONS, CompareOptions
from moa.cli.demo import DEMO_OPTIONS, DemoOptions
from moa.cli.evaluate import EVALUATE_OPTIONS, EvaluateOptions
from moa.cli.main import build_parser, main
from moa.cli.options import (
    Option,
    options_dataclass,
    positive_int,
    read_config_file,
    seed,
    text,
)
from moa.cli.train import TRAIN_OPTIONS, TrainOptions

COMMANDS = [  # (subcommand, its table, its dataclass, the inputs it reads besides options)
    ("demo", DEMO_OPTIONS, DemoOptions, ()),
    ("train", TRAIN_OPTIONS, TrainOptions, ("config",)),
    ("evaluate", EVALUATE_OPTIONS, EvaluateOptions, ("config",)),
    ("compare", COMPARE_OPTIONS, CompareOptions, ()),
    ("bench", BENCH_OPTIONS, BenchOptions, ()),
    ("check", CHECK_OPTIONS, CheckOptions, ()),
]


@pytest.mark.parametrize("command,table,options_class,inputs", COMMANDS,
                         ids=[c[0] for c in COMMANDS])
def test_the_dataclass_is_the_table(command, table, options_class, inputs):
    # one field per option, in the table's order, with its default, then the inputs
    fields = dataclasses.fields(options_class)
    assert [f.name for f in fields] == [o.name for o in table] + list(inputs)
    assert [f.default for f in fields[:len(table)]] == [o.default for o in table]
    assert all(f.kw_only for f in fields)
    assert options_class.OPTIONS is table


@pytest.mark.parametrize("command,table,options_class,inputs", COMMANDS,
                         ids=[c[0] for c in COMMANDS])
def test_every_flag_comes_from_the_table(command, table, options_class, inputs):
    subcommand = build_parser()._subparsers._group_actions[0].choices[command]
    flags = {a.option_strings[0] for a in subcommand._actions if a.option_strings} - \
        {"-h", "--config"}
    assert flags == {o.flag for o in table}


def test_options_are_keywords_only():
    with pytest.raises(TypeError):
        TrainOptions("data.jsonl")  # positional: which field would it be?
    assert TrainOptions(data="data.jsonl").data == "data.jsonl"


def test_a_commands_from_args_fills_the_defaults():
    args = build_parser().parse_args(["check", "--cases", "2"])
    assert CheckOptions.from_args(args) == CheckOptions(device="cpu", cases=2, seed=None)


def test_the_derived_dataclass_keeps_its_own_checks():
    # CompareOptions' __post_init__ turns the table's default "3e-4" into {variant: lr}
    assert CompareOptions().lr == {"*": 3e-4}
    with pytest.raises(ValueError, match="--fsdp and --deepspeed ds.json conflict"):
        TrainOptions(data="d.jsonl", fsdp=True, deepspeed="ds.json")


def test_a_table_and_its_class_may_not_both_define_a_field():
    table = (Option("steps", positive_int, 1, "steps"),)
    with pytest.raises(TypeError, match=r"defines \['steps'\]"):
        @options_dataclass(table)
        class Clash:
            steps = 2
    with pytest.raises(ValueError, match="'steps' is an option and an input"):
        options_dataclass(table, steps=None)


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "compare", "bench",
                                     "check"])
def test_one_device_convention(command, capsys):
    # every subcommand refuses what is not a device, with the same words
    assert main([command, "--device", "banana"]) == 2
    assert "unknown device 'banana'; use " in capsys.readouterr().err
    assert main([command, "--device", "meta"]) == 2
    assert "unsupported device 'meta'; use " in capsys.readouterr().err


@pytest.mark.parametrize("command,takes_auto", [
    ("train", True), ("evaluate", True), ("compare", True),  # pick a GPU when there is one
    ("demo", False), ("bench", False), ("check", False),  # the CPU unless told otherwise
])
def test_auto_only_where_a_command_picks_its_device(command, takes_auto):
    action = next(a for a in build_parser()._subparsers._group_actions[0]
                  .choices[command]._actions if a.dest == "device")
    if takes_auto:
        assert action.type("auto") == "auto"
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="unknown device 'auto'; use cpu, "
                                                              "cuda or cuda:N"):
            action.type("auto")
    assert action.type("cpu") == "cpu"


@pytest.mark.parametrize("value,message", [
    ("1.5", "expected an integer seed, got '1.5'"),  # not an integer (a flag's text)
    (1.5, "expected an integer seed, got 1.5"),  # not an integer (a config file's number)
    (True, "expected an integer seed, got True"),  # a bool is no seed
    ("-1", "expected a seed in [0, 2**63), got '-1'"),  # below the range
    (2**63, "expected a seed in [0, 2**63), got 9223372036854775808"),  # above it
])
def test_seed_messages(value, message):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        seed(value)
    assert str(error.value) == message


def test_a_config_file_value_is_checked_against_the_choices(tmp_path):
    table = (Option("fruit", text, "apple", "a fruit", choices=("apple", "pear")),)
    path = tmp_path / "c.json"
    path.write_text('{"fruit": "pear"}')
    assert read_config_file(path, table) == {"fruit": "pear"}
    path.write_text('{"fruit": "plum"}')
    with pytest.raises(ValueError, match="fruit: invalid choice: 'plum'; allowed: apple, "
                                         "pear"):
        read_config_file(path, table)


def test_a_config_path_that_is_a_folder_or_missing_says_which(tmp_path):
    table = (Option("fruit", text, "apple", "a fruit"),)
    with pytest.raises(IsADirectoryError, match="is a folder; give a JSON or YAML file"):
        read_config_file(tmp_path, table)
    with pytest.raises(FileNotFoundError, match="no such config file"):
        read_config_file(tmp_path / "missing.json", table)
