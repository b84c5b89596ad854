"""The layer ratios (L1, M8) of two source trees, measured in one run.

    git worktree add /tmp/moa-old <old commit>   # outside the repository
    .venv/bin/python benchmarks/compare_commits.py /tmp/moa-old /path/to/new [--rounds 7]
    .venv/bin/python benchmarks/compare_commits.py /tmp/moa-old /path/to/new --in-process
    git worktree remove /tmp/moa-old

Subprocess mode (default): each round runs the tree's `layer_benchmark` (moa/cli/bench.py;
moa/bench.py in trees from before the applications moved) once per tree, each in a fresh
subprocess with PYTHONPATH at that tree (so the tree's own `moa` and
`moa_kernels` are imported; the worker checks that), the trees' order alternating from
round to round so that drift of the machine falls on both alike. Within a worker the ratios
are those of `moa bench` (every case against the frozen base, interleaved; medians of the
ratio within each inner round). The report gives, per tree, the median and range over the
rounds of every ratio, and the median and range of the within-round ratio new / old.

In-process mode (--in-process): both trees are imported into one process (each under its
own set of `moa*` modules, swapped into sys.modules around every call), their layers built
over the same frozen nn.Linear and input, and every round times the base, then each case of
old and new back to back. Old and new are then paired within ~0.1 s, so load from elsewhere
on the machine falls on both alike; the ratios are medians over rounds of the within-round
ratio, as in `moa bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _worker(args: argparse.Namespace) -> None:
    import torch

    import moa
    import moa_kernels

    tree = Path(args.worker).resolve()
    for module in (moa, moa_kernels):
        if tree not in Path(module.__file__).resolve().parents:
            raise SystemExit(f"{module.__name__} imported from {module.__file__}, not {tree}")
    import importlib

    bench = importlib.import_module(bench_module(tree))
    layer_benchmark, overhead_ratio = bench.layer_benchmark, bench.overhead_ratio
    backends = args.backends.split(",")
    rows = layer_benchmark(backends, tokens=args.tokens, features=args.features,
                           rounds=args.inner_rounds)
    pick = {(r.case, r.backend): r for r in rows}
    metrics = {}
    for (case, backend), row in pick.items():
        if case == "base":
            metrics["base fwd ms"] = row.forward_ms
            metrics["base fwd+bwd ms"] = row.fwd_bwd_ms
            continue
        metrics[f"{case} [{backend}] fwd / base"] = row.forward_ratio
        metrics[f"{case} [{backend}] fwd+bwd / base"] = row.fwd_bwd_ratio
    for backend in backends:
        for train, phase in ((False, "fwd"), (True, "fwd+bwd")):
            metrics[f"M8 topk2 overhead / soft overhead [{backend}] {phase}"] = overhead_ratio(
                rows, "M8 topk2", "M8 soft", backend, train)
    if {"torch", "reference"} <= set(backends):
        metrics["L1 fwd+bwd speed-up torch over reference"] = (
            pick[("L1 soft", "reference")].fwd_bwd_ms / pick[("L1 soft", "torch")].fwd_bwd_ms)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "metrics": metrics}))


def bench_module(tree: Path) -> str:
    """The name of the tree's benchmark module: moa.cli.bench, or moa.bench in trees from
    before the applications moved into moa/cli/."""
    return "moa.cli.bench" if (tree / "moa" / "cli" / "bench.py").is_file() else "moa.bench"


def _run_tree(tree: Path, args: argparse.Namespace) -> dict:
    environment = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree),
               "--backends", args.backends, "--inner-rounds", str(args.inner_rounds),
               "--tokens", str(args.tokens), "--features", str(args.features)]
    done = subprocess.run(command, env=environment, capture_output=True, text=True,
                          check=False, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(f"worker for {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _git_commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--",
                            "moa", "moa_kernels"], capture_output=True, text=True, check=False)
    commit = done.stdout.strip() or "?"
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _load_tree(tree: Path) -> dict:
    """Import tree's moa and moa_kernels (with the torch and reference backends) and return
    their sys.modules entries; sys.modules is left without any moa* module."""
    def purge() -> None:
        for name in [n for n in sys.modules if n.split(".")[0] in ("moa", "moa_kernels")]:
            del sys.modules[name]

    purge()
    sys.path.insert(0, str(tree))
    try:
        import importlib

        for name in ("moa", bench_module(tree), "moa.layers", "moa_kernels",
                     "moa_kernels.torch_ops", "moa_kernels.reference"):
            module = importlib.import_module(name)
            if tree not in Path(module.__file__).resolve().parents:
                raise SystemExit(f"{name} imported from {module.__file__}, not {tree}")
        modules = {n: m for n, m in sys.modules.items()
                   if n.split(".")[0] in ("moa", "moa_kernels")}
    finally:
        sys.path.remove(str(tree))
        purge()
    return modules


def _in_process(trees: list[Path], args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = [_load_tree(tree) for tree in trees]
    backends = args.backends.split(",")
    torch.manual_seed(0)
    base = nn.Linear(args.features, args.features).requires_grad_(False)
    x = torch.randn(args.tokens, args.features, requires_grad=True)
    grad_y = torch.randn(args.tokens, args.features)

    def steps(module, modules):
        def forward() -> None:
            sys.modules.update(modules)
            with torch.no_grad():
                module(x)

        def train() -> None:
            sys.modules.update(modules)
            x.grad = None
            module(x).backward(grad_y)

        return forward, train

    functions = {}
    functions["base/forward"], functions["base/train"] = steps(base, {})
    bench = [modules[bench_module(tree)] for tree, modules in zip(trees, loaded)]
    cases = [c.name for c in bench[0].LAYER_CASES]
    keys = []
    for case_index, case_name in enumerate(cases):
        for backend in backends:
            for index, modules in enumerate(loaded):
                case = bench[index].LAYER_CASES[case_index]
                if case.name != case_name:
                    raise SystemExit(f"the trees' layer cases differ: {case.name} vs {case_name}")
                sys.modules.update(modules)
                torch.manual_seed(1)
                layer = modules["moa.layers"].MoALinear(base, list(case.experts), case.router,
                                                        backend=backend)
                with torch.no_grad():  # B starts at zero; give the experts real work
                    layer.expand_weight.normal_(0.0, 0.02)
                key = (case_name, backend, index)
                keys.append(key)
                functions[key + ("forward",)], functions[key + ("train",)] = steps(
                    layer, modules)
    # One round: every function once: the base, then each case of old and new back to back,
    # old first in even rounds and new first in odd ones.
    order = list(functions)
    swapped = [name if isinstance(name, str)
               else name[:2] + (1 - name[2],) + name[3:] for name in order]
    samples = {name: [] for name in functions}
    for fn in functions.values():  # warm-up
        fn()
    start = time.perf_counter()
    for round_index in range(args.rounds):
        for name in order if round_index % 2 == 0 else swapped:
            fn = functions[name]
            begin = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - begin)
        print(f"round {round_index + 1}/{args.rounds} done, {time.perf_counter() - start:.0f} s",
              flush=True)

    def ratios(name, reference):
        return [a / b for a, b in zip(samples[name], samples[reference])]

    def cell(values):
        return f"{statistics.median(values):7.3f} {min(values):6.3f}-{max(values):<6.3f}"

    if args.json:
        Path(args.json).write_text(json.dumps(
            {"trees": [str(t) for t in trees], "threads": torch.get_num_threads(),
             "samples": {"/".join(map(str, k)) if isinstance(k, tuple) else k: v
                         for k, v in samples.items()}}))
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"base: fwd {statistics.median(samples['base/forward']) * 1e3:.1f} ms, fwd+bwd "
          f"{statistics.median(samples['base/train']) * 1e3:.1f} ms (medians)")
    print("\nper cell: median over rounds of the within-round ratio, then its range")
    header = (f"{'case':9s} {'backend':9s} {'phase':7s} | {'old / base':>21s} | "
              f"{'new / base':>21s} | {'new / old':>21s}")
    print(header)
    fastest = {name: min(values) for name, values in samples.items()}
    per_tree, of_minima = {}, []
    for case_name in cases:
        for backend in backends:
            for phase, label in (("forward", "fwd"), ("train", "fwd+bwd")):
                base_name = f"base/{phase}"
                old = ratios((case_name, backend, 0, phase), base_name)
                new = ratios((case_name, backend, 1, phase), base_name)
                paired = ratios((case_name, backend, 1, phase), (case_name, backend, 0, phase))
                per_tree[(case_name, backend, phase)] = (old, new)
                old_min = fastest[(case_name, backend, 0, phase)]
                new_min = fastest[(case_name, backend, 1, phase)]
                of_minima.append(f"{case_name:9s} {backend:9s} {label:7s} | "
                                 f"{old_min / fastest[base_name]:10.3f} | "
                                 f"{new_min / fastest[base_name]:10.3f} | "
                                 f"{new_min / old_min:10.3f}")
                print(f"{case_name:9s} {backend:9s} {label:7s} | {cell(old)} | {cell(new)} | "
                      f"{cell(paired)}")
    print("\nthe same from each function's fastest round (load from elsewhere only adds time)")
    print(f"{'case':9s} {'backend':9s} {'phase':7s} | {'old / base':>10s} | {'new / base':>10s} | "
          f"{'new / old':>10s}")
    print("\n".join(of_minima))
    print()
    for backend in backends:
        for phase, label in (("forward", "fwd"), ("train", "fwd+bwd")):
            values = []
            for index in (0, 1):
                sparse = per_tree[("M8 topk2", backend, phase)][index]
                dense = per_tree[("M8 soft", backend, phase)][index]
                per_round = [(a - 1) / (b - 1) for a, b in zip(sparse, dense)]
                of_medians = (statistics.median(sparse) - 1) / (statistics.median(dense) - 1)
                values.append(f"{of_medians:6.2f} (rounds {min(per_round):.2f}-"
                              f"{max(per_round):.2f})")
            print(f"M8 topk2 overhead / soft overhead [{backend}] {label}: old {values[0]}, "
                  f"new {values[1]}")
    if {"torch", "reference"} <= set(backends):
        for index, tree in enumerate(("old", "new")):
            speedup = ratios(("L1 soft", "reference", index, "train"),
                             ("L1 soft", "torch", index, "train"))
            print(f"L1 fwd+bwd speed-up of torch over reference, {tree}: {cell(speedup)}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s of rounds")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", help="two source trees: old, new")
    parser.add_argument("--rounds", type=int, default=7, help="outer rounds (default 7)")
    parser.add_argument("--inner-rounds", type=int, default=5,
                        help="interleaved rounds inside each worker (default 5)")
    parser.add_argument("--backends", default="torch,reference")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--in-process", action="store_true",
                        help="both trees in one process, old and new timed back to back")
    parser.add_argument("--threads", type=int, default=0,
                        help="in-process: torch threads (default: torch's own choice)")
    parser.add_argument("--json", help="in-process: write every sample (seconds) here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if len(args.trees) != 2:
        parser.error("give two source trees: old and new")
    trees = [Path(t).resolve() for t in args.trees]
    labels = [f"{t.name}@{_git_commit(t)}" for t in trees]
    print(f"trees: old = {trees[0]} ({labels[0]}), new = {trees[1]} ({labels[1]})")
    print(f"machine: {platform.machine()} {platform.processor()}, python {sys.executable}")
    if args.in_process:
        print(f"in-process, {args.rounds} rounds, T = {args.tokens}, nn.Linear("
              f"{args.features}, {args.features}), fp32, backends {args.backends}")
        _in_process(trees, args)
        return
    print(f"{args.rounds} rounds x 2 trees, each worker {args.inner_rounds} inner rounds, "
          f"T = {args.tokens}, nn.Linear({args.features}, {args.features}), fp32, backends "
          f"{args.backends}")
    results: list[list[dict]] = [[], []]
    start = time.perf_counter()
    for round_index in range(args.rounds):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for index in order:
            results[index].append(_run_tree(trees[index], args))
        print(f"round {round_index + 1}/{args.rounds} done, {time.perf_counter() - start:.0f} s",
              flush=True)
    print(f"torch {results[0][0]['torch']} ({results[0][0]['threads']} threads)")
    names = list(results[0][0]["metrics"])
    width = max(len(n) for n in names)
    print(f"\n{'metric':{width}s} | {'old median':>10s} {'old range':>15s} | "
          f"{'new median':>10s} {'new range':>15s} | {'new/old med':>11s} {'new/old range':>15s}")
    for name in names:
        old = [r["metrics"][name] for r in results[0]]
        new = [r["metrics"][name] for r in results[1]]
        paired = [b / a for a, b in zip(old, new)]
        print(f"{name:{width}s} | {statistics.median(old):10.3f} "
              f"{min(old):7.3f}-{max(old):<7.3f} | {statistics.median(new):10.3f} "
              f"{min(new):7.3f}-{max(new):<7.3f} | {statistics.median(paired):11.3f} "
              f"{min(paired):7.3f}-{max(paired):<7.3f}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
