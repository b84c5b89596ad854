"""The applications: the `moa` command (also `python -m moa`) and its subcommands, built on
the moa library. Nothing in the library imports this package.

main.py        the parser and dispatch (main: pyproject's `moa` entry point)
options.py     one options system: Option tables, validators, --config files, dataclasses
demo.py        `moa demo`: a preset trained end to end on an embedded tiny model
train.py       `moa train`: the transformers Trainer on a data file
evaluate.py    `moa evaluate`: accuracy on multiple-choice and arithmetic records
compare.py     `moa compare`: variants x seeds, resumable; beside it compare_options.py,
               compare_variants.py, compare_runs.py, compare_summary.py, statistics.py
bench.py       `moa bench`: layer, training-step and decoding benchmarks
check.py       `moa check`: every backend against the reference
data.py        reading and tokenising the data files
loading.py     base models and tokenizers (a checkpoint, a .gguf file, the embedded model)
outputs.py     what an output folder may hold, and the checks before writing into it
plots.py       the PNG plots
tiny_models.py the one builder of the small Llamas made from a config (demo, loading, bench)
"""

from moa.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
