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
import sys
from pathlib import Path

from moa.config import PRESETS


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already speaks of it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: {action.default})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line instead of usage + message
        raise CommandError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {text!r}")
    return value


def _device(text: str) -> str:
    from moa.cli.train import torch_device  # one convention for every command's --device

    return torch_device(text)


def _checkpoint_dir(text: str) -> str:
    path = Path(text)
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"--model {text!r}: no such GGUF file")
        return text
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"--model {text!r} is not a directory (nor a .gguf "
                                         "file)")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"--model {text!r} is not a transformers checkpoint (no config.json in it)")
    return text


def build_parser() -> argparse.ArgumentParser:
    from moa import __version__

    parser = _Parser(prog="moa", description="Heterogeneous Mixture-of-Adapters fine-tuning.")
    parser.add_argument("--version", action="version", version=f"moa {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser("demo", help="train a preset on a small model end to end")
    demo.add_argument("--preset", choices=tuple(PRESETS), default="soft_moa",
                      help="MoAConfig preset to inject")
    demo.add_argument("--steps", type=_positive_int, default=200, help="training steps")
    demo.add_argument("--model", type=_checkpoint_dir, default=None,
                      help="a local transformers causal-LM checkpoint directory or a .gguf "
                           "file (default: an embedded 4-layer Llama built from a config)")
    demo.add_argument("--out", default="moa-demo",
                      help="output directory; one that holds another run is refused unless "
                           "--overwrite is given")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the run already in --out (its adapter/ and plots are "
                           "removed)")
    demo.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the model and the data")

    from moa.cli.evaluate import EVALUATE_OPTIONS
    from moa.cli.train import TRAIN_OPTIONS, add_options

    train = commands.add_parser("train", help="fine-tune MoA adapters on a JSON/JSONL file "
                                "with the transformers Trainer")
    train.add_argument("--config", metavar="FILE", default=None,
                       help="JSON or YAML file of options, keyed as the flags without dashes; "
                            "flags given override it")
    add_options(train, TRAIN_OPTIONS)
    evaluate = commands.add_parser("evaluate", help="accuracy on multiple-choice and "
                                   "arithmetic records, with or without an adapter")
    evaluate.add_argument("--config", metavar="FILE", default=None,
                          help="JSON or YAML file of options, keyed as the flags; flags given "
                               "override it")
    add_options(evaluate, EVALUATE_OPTIONS)
    from moa.cli.compare import COMPARE_OPTIONS

    compare = commands.add_parser("compare", help="train and score several variants over "
                                  "several seeds; a table with 95%% intervals")
    compare.add_argument("--config", metavar="FILE", default=None,
                         help="JSON or YAML file of options, keyed as the flags; flags given "
                              "override it")
    add_options(compare, COMPARE_OPTIONS)

    bench = commands.add_parser("bench", help="layer and model benchmarks, as ratios")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes, no compiled memory workers: 1.5-4 minutes on 2 CPU "
                            "cores (less with a warm inductor cache)")
    bench.add_argument("--out", default="bench-out", help="directory for CSV and PNG")
    bench.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    bench.add_argument("--rounds", type=_positive_int, default=None,
                       help="timing rounds per benchmark (default: 7 for layers, 5 for the "
                            "model and decode benchmarks; 3 each with --quick)")

    check = commands.add_parser("check", help="verify each backend against the reference")
    check.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    check.add_argument("--cases", type=_positive_int, default=3, help="random cases per mode")
    check.add_argument("--seed", type=_seed, default=None,
                       help="repeat a run's random cases (default: a fresh seed, printed)")
    return parser


def _demo(args) -> int:
    from moa.cli.demo import run_demo

    result = run_demo(args.preset, args.steps, args.model, args.out, args.device, args.seed,
                      overwrite=args.overwrite)
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
    from moa.cli.compare import CompareOptions, run_compare

    return 1 if run_compare(CompareOptions.from_args(args)).failed else 0


def _bench(args) -> int:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise CommandError("moa bench compares with PEFT LoRA and needs peft: "
                           "pip install 'moa[bench]'") from None
    from moa.cli.bench import run_bench

    run_bench(quick=args.quick, out_dir=args.out, device=args.device, rounds=args.rounds)
    return 0


def _check(args) -> int:
    import random

    import torch

    from moa.cli.check import available_backends, check_backends

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"seed {seed} (repeat with --seed {seed})")
    if "triton" not in available_backends(torch.device(args.device)):
        print("triton: skipped (needs a CUDA device, or TRITON_INTERPRET=1 on the CPU, and "
              "triton installed)")
    results = check_backends(args.device, args.cases, seed)
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
    try:
        args = build_parser().parse_args(argv)
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

        if isinstance(error, TrainingInterrupted):
            print(_interrupted_training(error, argv), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
