"""The eager training step of two source trees against PEFT LoRA r=16, in one process.

    git archive <old commit> | tar -x -C /tmp/moa-old      # outside the repository
    .venv/bin/python benchmarks/compare_steps.py /tmp/moa-old /path/to/new [--rounds 5]
        [--variants soft_moa/torch,sparse_moa/torch] [--quick]

Both trees are imported into this process (each under its own set of `moa*` modules,
benchmarks/compare_commits.py's `_load_tree`), each variant built by its tree's
`moa.bench.build_variant` on `moa.bench`'s model shape (MODEL_FULL, or MODEL_QUICK with
--quick) with the same seed, and timed by its `training_step` (forward with labels,
backward, AdamW step), against one PEFT LoRA r=16 model. Every round runs each step
once, the order alternating from round to round, so load from elsewhere on the machine
falls on all alike; the report gives medians over rounds of the within-round ratios
(old / PEFT, new / PEFT, new / old) and their ranges. --clock process times the process's
CPU time instead of wall time (on a loaded machine, less of the other processes' work).
--decode times the eager greedy `generate` call instead (4 prompts of 64 tokens, 32 new
tokens, the KV cache; `moa bench`'s decode call), each model in eval mode.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path


def _compare_commits():
    spec = importlib.util.spec_from_file_location(
        "compare_commits", Path(__file__).resolve().parent / "compare_commits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_call(model, shape, device, new_tokens: int = 32, prompt: int = 64,
                  batch: int = 4):
    """The eager greedy generate call of `moa bench`'s decode rows, as a function."""
    import torch

    model.eval()
    ids = torch.randint(0, shape.vocab, (batch, prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def generate() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, use_cache=True, pad_token_id=0)
    return generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs=2, help="two source trees: old, new")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="soft_moa/torch,sparse_moa/torch")
    parser.add_argument("--quick", action="store_true", help="moa.bench's MODEL_QUICK shape")
    parser.add_argument("--decode", action="store_true",
                        help="time the eager generate call instead of the training step")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall time, or the process's CPU time (all its threads): on a "
                             "machine others load, CPU time counts less of their work")
    args = parser.parse_args(argv)
    import torch

    trees = [Path(t).resolve() for t in args.trees]
    loaded = [_compare_commits()._load_tree(tree) for tree in trees]
    device = torch.device("cpu")
    steps = {}
    bench_module = _compare_commits().bench_module
    for index, (tree, modules) in enumerate(zip(trees, loaded)):
        sys.modules.update(modules)
        bench = modules[bench_module(tree)]
        shape = bench.MODEL_QUICK if args.quick else bench.MODEL_FULL
        timed = generate_call if args.decode else bench.training_step
        if index == 0:
            peft, _ = bench.build_variant("peft_lora", shape, device)
            steps["peft"] = (timed(peft, shape, device), modules)
        for variant in args.variants.split(","):
            model, _ = bench.build_variant(variant, shape, device)
            steps[(variant, index)] = (timed(model, shape, device), modules)

    clock = time.process_time if args.clock == "process" else time.perf_counter

    def run(name) -> float:
        step, modules = steps[name]
        sys.modules.update(modules)
        begin = clock()
        step()
        return clock() - begin

    order = list(steps)
    for name in order:  # warm-up
        run(name)
    samples = {name: [] for name in order}
    start = time.perf_counter()
    for round_index in range(args.rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            samples[name].append(run(name))
        print(f"round {round_index + 1}/{args.rounds}, {time.perf_counter() - start:.0f} s",
              flush=True)

    def cell(values) -> str:
        return f"{statistics.median(values):6.3f} ({min(values):.3f}-{max(values):.3f})"

    def ratios(a, b) -> list[float]:
        return [x / y for x, y in zip(samples[a], samples[b])]

    print(f"{'generate call' if args.decode else 'training step'}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock; old {trees[0]}, "
          f"new {trees[1]}; PEFT median "
          f"{statistics.median(samples['peft']) * 1e3:.0f} ms")
    print(f"{'variant':18s} {'old / PEFT':>22s} {'new / PEFT':>22s} {'new / old':>22s}")
    for variant in args.variants.split(","):
        old, new = (variant, 0), (variant, 1)
        print(f"{variant:18s} {cell(ratios(old, 'peft')):>22s} {cell(ratios(new, 'peft')):>22s}"
              f" {cell(ratios(new, old)):>22s}")
    fastest = {name: min(values) for name, values in samples.items()}
    print("the same from each step's fastest round (load from elsewhere only adds time):")
    for variant in args.variants.split(","):
        old, new = fastest[(variant, 0)], fastest[(variant, 1)]
        print(f"{variant:18s} {old / fastest['peft']:22.3f} {new / fastest['peft']:22.3f} "
              f"{new / old:22.3f}")


if __name__ == "__main__":
    main()
