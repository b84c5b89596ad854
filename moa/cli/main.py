"""The `moa` command (also `python -m moa`): demo, train, evaluate, compare, bench, check.

Bad flags and bad paths end in one line on stderr and a non-zero exit, never a traceback:
exit status 2 for bad flags, 1 for a ValueError or OSError (a bad checkpoint, an output
path that cannot be written) and for running out of memory. Any other exception is a bug
and keeps its traceback. Ctrl-C exits with status 130 ("moa: interrupted"; during `moa
train`'s training a second line says where the newest checkpoint is and prints the command
that continues from it, or that none was saved yet).
"""

from __future__ import annotations

import argparse
import logging
import sys


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


# What libraries under transformers log once when they are imported where their optional
# compiled kernels cannot run (a CPU): nothing about the user's command, printed before its
# first line. Each is dropped on its own logger by its own words; any other record passes.
IMPORT_NOTICES = {
    "torchao": ("Failed to load ", ".so"),  # its CUDA extension libraries
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),  # torchao's
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}


class _ImportNotice(logging.Filter):
    def __init__(self, words: tuple[str, ...]) -> None:
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(word in message for word in self.words)


def quiet_import_notices() -> None:
    """Drop IMPORT_NOTICES' records from here on (once per process)."""
    for name, words in IMPORT_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ImportNotice) for f in logger.filters):
            logger.addFilter(_ImportNotice(words))


class _Parser(argparse.ArgumentParser):
    """Every subcommand's flags come from its Option table (moa/cli/options.py), whose help
    states each default."""

    def error(self, message: str) -> None:  # one line instead of usage + message
        raise CommandError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from moa import __version__

    parser = _Parser(prog="moa", description="Heterogeneous Mixture-of-Adapters fine-tuning.")
    parser.add_argument("--version", action="version", version=f"moa {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    commands.required = True

    from moa.cli.bench import BENCH_OPTIONS
    from moa.cli.check import CHECK_OPTIONS
    from moa.cli.compare_options import COMPARE_OPTIONS
    from moa.cli.demo import DEMO_OPTIONS
    from moa.cli.evaluate import EVALUATE_OPTIONS
    from moa.cli.options import add_options
    from moa.cli.train import TRAIN_OPTIONS

    demo = commands.add_parser("demo", help="train a preset on a small model end to end")
    add_options(demo, DEMO_OPTIONS)
    for name, help_text, options in [
            ("train", "fine-tune MoA adapters on a JSON/JSONL file with the transformers "
             "Trainer", TRAIN_OPTIONS),
            ("evaluate", "accuracy on multiple-choice and arithmetic records, with or without "
             "an adapter", EVALUATE_OPTIONS),
            ("compare", "train and score several variants over several seeds; a table with "
             "95%% intervals", COMPARE_OPTIONS)]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", metavar="FILE", default=None,
                             help="JSON or YAML file of options, keyed as the flags without "
                                  "dashes; flags given override it")
        add_options(command, options)
    bench = commands.add_parser("bench", help="layer and model benchmarks, as ratios")
    add_options(bench, BENCH_OPTIONS)
    check = commands.add_parser("check", help="verify each backend against the reference")
    add_options(check, CHECK_OPTIONS)
    return parser


def _demo(args) -> int:
    from moa.cli.demo import DemoOptions, run_demo

    options = DemoOptions.from_args(args)
    result = run_demo(options.preset, options.steps, options.model, options.out,
                      options.device, options.seed, overwrite=options.overwrite)
    print(f"done in {result.seconds:.1f} s: loss {result.losses[0]:.3f} -> "
          f"{result.losses[-1]:.3f}")
    return 0


def _train(args) -> int:
    from moa.cli.train import TrainOptions, run_train
    from moa.distributed import current_world

    result = run_train(TrainOptions.from_args(args))
    if current_world().is_main:  # launched as several processes, rank 0 speaks for all
        print(f"done in {result.seconds:.1f} s")
    return 0


def _evaluate(args) -> int:
    from moa.cli.evaluate import EvaluateOptions, run_evaluate

    run_evaluate(EvaluateOptions.from_args(args))
    return 0


def _compare(args) -> int:
    from moa.cli.compare import run_compare
    from moa.cli.compare_options import CompareOptions

    return 1 if run_compare(CompareOptions.from_args(args)).failed else 0


def _bench(args) -> int:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise CommandError("moa bench compares with PEFT LoRA and needs peft: "
                           "pip install 'moa[bench]'") from None
    from moa.cli.bench import BenchOptions, run_bench

    options = BenchOptions.from_args(args)
    run_bench(quick=options.quick, out_dir=options.out, device=options.device,
              rounds=options.rounds)
    return 0


def _check(args) -> int:
    import random

    import torch

    from moa.cli.check import CheckOptions, available_backends, check_backends

    options = CheckOptions.from_args(args)
    seed = options.seed if options.seed is not None else random.randrange(2**31)
    print(f"seed {seed} (repeat with --seed {seed})")
    if "triton" not in available_backends(torch.device(options.device)):
        print("triton: skipped (needs a CUDA device, or TRITON_INTERPRET=1 on the CPU, and "
              "triton installed)")
    results = check_backends(options.device, options.cases, seed)
    print(f"{'result':6s} {'backend':8s} {'mode':9s} {'out err':>8s} {'dx err':>8s} "
          f"{'grad err':>8s}  case   (errors relative to the reference backend; grad: "
          "every trainable tensor's gradient as one vector)")
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL':6s} {r.backend:8s} {r.mode:9s} "
              f"{r.output_error:8.1e} {r.input_grad_error:8.1e} {r.param_grad_error:8.1e}  "
              f"{r.description}")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed (tolerance "
          f"{results[0].tolerance:g} relative, fp32, TF32 off)")
    return 1 if failed else 0


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _without(argv: list[str], flags: tuple[str, ...], takes_value: bool) -> list[str]:
    """argv less each of `flags` (with its value where it takes one, also as --flag=value)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in flags:
            skip = takes_value
        elif not any(word.startswith(flag + "=") for flag in flags):
            kept.append(word)
    return kept


def resume_command(argv: list[str], overwrite_in_config: bool = False) -> str:
    """The `moa train` command line that continues the run of `argv` from its newest
    checkpoint: the same arguments with --resume last, less --overwrite (it would remove
    the checkpoints; --no-overwrite where the --config file sets it)."""
    import shlex

    words = _without(argv, ("--resume",), takes_value=True)
    words = _without(words, ("--overwrite", "--no-overwrite"), takes_value=False)
    words += ["--resume", "last"] + (["--no-overwrite"] if overwrite_in_config else [])
    return shlex.join(["moa", *words])


def _interrupted_training(error, argv: list[str]) -> str:
    """What Ctrl-C during `moa train` leaves, and how to continue."""
    if error.checkpoint is None:
        return (f"moa: no checkpoint was saved yet (the first comes at step "
                f"{error.save_interval}, --save-interval); the same command starts the "
                "run again")
    overwrite_in_config = error.overwrite and "--overwrite" not in argv
    return (f"moa: the newest checkpoint is {error.checkpoint}; continue from it with: "
            f"{resume_command(argv, overwrite_in_config)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_import_notices()
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return {"demo": _demo, "train": _train, "evaluate": _evaluate, "compare": _compare,
                "bench": _bench, "check": _check}[args.command](args)
    except CommandError as error:
        print(f"moa: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, MemoryError) as error:
        print(f"moa: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if type(error).__name__ != "OutOfMemoryError":  # torch's, without importing torch
            raise
        print(f"moa: error: out of memory: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        print("moa: interrupted", file=sys.stderr)
        from moa.cli.train import TrainingInterrupted

        if command == "compare":  # its runs' own checkpoints are not for the user to resume
            print("moa: the runs finished so far are kept (the summary written from them); "
                  "the same command continues with the others", file=sys.stderr)
        elif isinstance(error, TrainingInterrupted):
            print(_interrupted_training(error, argv), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
