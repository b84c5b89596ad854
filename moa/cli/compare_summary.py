"""The summary of a `moa compare` folder: compare.json (per variant the mean accuracy and
its interval, the paired difference from the reference, step time, peak memory, the runs),
compare.md (a Markdown table, also printed) and compare.png.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from moa.cli.compare_runs import FORMAT_VERSION, Plan, load_result
from moa.cli.compare_variants import BASE
from moa.cli.outputs import write_json_atomic, write_text_atomic
from moa.cli.statistics import (
    CI_METHOD,
    PAIRED_METHOD,
    accuracy_interval,
    correctness_matrix,
    paired_difference,
)

# A router has collapsed onto one expert where that expert takes at least this share of the
# router's summed mean gate on the probe prompts (softmax routers: a mean gate of 0.9).
COLLAPSE_SHARE = 0.9


def routing_summary(router_stats: dict | None) -> dict | None:
    """What a run's router statistics (per router: its experts' mean gate and active
    fraction on the probe prompts) say about collapse and sparsity: `routers` (those with
    two or more experts, the ones that can collapse), `collapsed` (how many of them give
    one expert at least COLLAPSE_SHARE of their summed mean gate), `silent` (how many give
    every expert a mean gate of 0: no expert runs), `non_finite` (how many have a mean gate
    that is NaN or infinite: a diverged router, counted apart), `largest_share` (the
    largest share of one expert; 1/E is an even split), and the mean and lowest active
    fraction over every (router, expert) pair (1.0: no expert is ever skipped). None for a
    run without routers (PEFT LoRA, plain LoRA)."""
    if not router_stats:
        return None
    routers = silent = non_finite = 0
    shares, active = [], []
    for entry in router_stats.values():
        active += entry["active_fraction"]
        gates = entry["mean_gate"]
        if len(gates) < 2:
            continue
        routers += 1
        if not all(math.isfinite(gate) for gate in gates):
            non_finite += 1
        elif sum(gates) > 0:
            shares.append(max(gates) / sum(gates))
        else:
            silent += 1
    return {"routers": routers,
            "collapsed": sum(share >= COLLAPSE_SHARE for share in shares), "silent": silent,
            "non_finite": non_finite,
            "largest_share": max(shares) if shares else None,
            "active_fraction_mean": statistics.fmean(active) if active else None,
            "active_fraction_min": min(active) if active else None}


def _routing_over_seeds(summaries: list[dict | None]) -> dict | None:
    """A variant's routing over its seeds: the most collapsed and silent routers and the
    largest share of any seed, the mean of the seeds' mean active fractions and the lowest."""
    summaries = [s for s in summaries if s is not None]
    if not summaries:
        return None
    shares = [s["largest_share"] for s in summaries if s["largest_share"] is not None]
    means = [s["active_fraction_mean"] for s in summaries
             if s["active_fraction_mean"] is not None]
    lows = [s["active_fraction_min"] for s in summaries if s["active_fraction_min"] is not None]
    return {"routers": summaries[0]["routers"],
            "collapsed_max": max(s["collapsed"] for s in summaries),
            "silent_max": max(s["silent"] for s in summaries),
            "non_finite_max": max(s["non_finite"] for s in summaries),
            "largest_share": max(shares) if shares else None,
            "active_fraction_mean": statistics.fmean(means) if means else None,
            "active_fraction_min": min(lows) if lows else None}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else None


def summarize(plan: Plan) -> dict:
    """compare.json's content from the results in DIR for the variants and seeds asked
    for."""
    options = plan.options
    base = load_result(plan.base_path())
    results = {v.name: {s: r for s in range(options.seeds)
                        if (r := load_result(plan.run_path(v.name, s))) is not None}
               for v in plan.variants}
    questions = base["questions"] if base else next(
        (r["questions"] for runs in results.values() for r in runs.values()), None)
    peak_kind = next((r["peak_memory"] for runs in results.values() for r in runs.values()),
                     None)
    reference_runs = results[plan.reference]
    rows = []
    for variant in plan.variants:
        runs = results[variant.name]
        row = {"name": variant.name, "kind": variant.kind, "source": variant.source,
               "lr": plan.rates[variant.name],
               "trainable_params": next((r["trainable_params"] for r in runs.values()), None),
               "seeds_finished": sorted(runs), "accuracy_mean": None, "accuracy_ci95": None,
               "accuracy_norm_mean": None, "seconds_per_step_median": None,
               "peak_memory_mb_max": None, "routing": None, "paired": None, "runs": []}
        if runs:
            correct = correctness_matrix([runs[s]["correct"] for s in sorted(runs)])
            mean, low, high = accuracy_interval(correct)
            norms = [r["accuracy_norm"] for r in runs.values()]
            row.update(
                accuracy_mean=mean, accuracy_ci95=[low, high],
                accuracy_norm_mean=None if None in norms else statistics.fmean(norms),
                seconds_per_step_median=_median([r["seconds_per_step"] for r in runs.values()]),
                peak_memory_mb_max=max(r["peak_memory_mb"] for r in runs.values()),
                routing=_routing_over_seeds([routing_summary(runs[s].get("router_stats"))
                                             for s in sorted(runs)]),
                runs=[{**{key: runs[s][key] for key in (
                    "seed", "accuracy", "accuracy_norm", "train_seconds", "seconds_per_step",
                    "peak_memory_mb", "steps")},
                    "routing": routing_summary(runs[s].get("router_stats"))}
                    for s in sorted(runs)])
            common = sorted(set(runs) & set(reference_runs))
            if variant.name != plan.reference and common:
                difference, low, high = paired_difference(
                    correctness_matrix([runs[s]["correct"] for s in common]),
                    correctness_matrix([reference_runs[s]["correct"] for s in common]))
                row["paired"] = {"reference": plan.reference, "seeds": common,
                                 "difference": difference, "difference_ci95": [low, high]}
        rows.append(row)
    return {
        "moa_compare": FORMAT_VERSION,
        "model": plan.defining["model"] or "the embedded text model",
        "data": options.data, "eval_data": options.eval_data, "test_questions": questions,
        "seeds": options.seeds, "reference": plan.reference,
        "training": {name: getattr(options, name) for name in (
            "steps", "epochs", "batch_size", "gradient_accumulation", "max_length",
            "warmup_steps", "weight_decay", "bf16", "gradient_checkpointing")},
        "ci_method": CI_METHOD, "paired_method": PAIRED_METHOD, "peak_memory": peak_kind,
        "base": None if base is None else {
            "name": BASE, "trainable_params": 0, "accuracy": base["accuracy"],
            "accuracy_ci95": list(accuracy_interval(correctness_matrix([base["correct"]]))[1:]),
            "accuracy_norm": base["accuracy_norm"]},
        "variants": rows,
    }


def _interval(values: list[float] | None, signed: bool = False) -> str:
    if values is None:
        return ""
    form = "+.4f" if signed else ".4f"
    return f"[{values[0]:{form}}, {values[1]:{form}}]"


def format_table(summary: dict) -> str:
    """The summary as a Markdown table: per variant the trainable parameters, mean accuracy
    with its 95% interval, the paired difference from the reference with its interval, the
    length-normalised accuracy, the median step time, the peak memory, the collapsed
    routers and the active fraction (`routing_summary`) and the seeds."""
    reference = summary["reference"]
    header = ("| variant | trainable params | accuracy | 95% interval | vs " + reference +
              " | 95% interval | length-normalised | s/step | peak MiB | collapsed routers"
              " | active | seeds |")
    lines = [header, "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    base = summary["base"]
    if base is not None:
        norm = "" if base["accuracy_norm"] is None else f"{base['accuracy_norm']:.4f}"
        lines.append(f"| base (no adapter) | 0 | {base['accuracy']:.4f} | "
                     f"{_interval(base['accuracy_ci95'])} | | | {norm} | | | | | |")
    for row in summary["variants"]:
        def number(key: str, form: str, row=row) -> str:
            return "" if row[key] is None else format(row[key], form)

        paired, routing = row["paired"], row.get("routing")
        collapsed = active = ""
        if routing is not None:
            collapsed = f"{routing['collapsed_max']}/{routing['routers']}"
            if routing["active_fraction_mean"] is not None:
                active = f"{routing['active_fraction_mean']:.3f}"
        versus = "reference" if row["name"] == reference else \
            ("" if paired is None else f"{paired['difference']:+.4f}")
        lines.append(
            f"| {row['name']} | {number('trainable_params', ',d')} | "
            f"{number('accuracy_mean', '.4f')} | {_interval(row['accuracy_ci95'])} | "
            f"{versus} | {_interval(paired and paired['difference_ci95'], signed=True)} | "
            f"{number('accuracy_norm_mean', '.4f')} | "
            f"{number('seconds_per_step_median', '.3f')} | "
            f"{number('peak_memory_mb_max', '.0f')} | {collapsed} | {active} | "
            f"{len(row['seeds_finished'])}/{summary['seeds']} |")
    return "\n".join(lines)


def write_summary(plan: Plan, summary: dict) -> list[Path]:
    """DIR/compare.json, DIR/compare.md and DIR/compare.png (when a run finished)."""
    from moa.cli import plots

    training = summary["training"]
    budget = f"{training['steps']} steps" if training["steps"] else \
        f"{training['epochs']:g} epochs"
    markdown = "\n".join([
        f"# moa compare: {summary['model']}", "",
        f"Training {summary['data']} ({budget}, batch {training['batch_size']} x "
        f"{training['gradient_accumulation']} accumulation, max length "
        f"{training['max_length']}); test {summary['eval_data']} "
        f"({summary['test_questions']} questions); seeds 0 to {summary['seeds'] - 1}.", "",
        format_table(summary), "",
        f"Accuracy: the mean over the seeds; its interval: {summary['ci_method']}.",
        f"vs {summary['reference']}: the mean difference in accuracy on the same questions; "
        f"its interval: {summary['paired_method']}.",
        f"s/step: median optimizer-step time; peak MiB: the largest over the seeds "
        f"({summary['peak_memory']}).",
        f"collapsed routers: of the routers with two or more experts, those giving one expert "
        f"at least {COLLAPSE_SHARE:g} of their summed mean gate on the probe prompts (the most "
        f"over the seeds); active: the mean fraction of (token, expert) pairs that run (1: "
        f"no expert is ever skipped). Per run: runs/VARIANT/seed-K.json, router_stats.", ""])
    files = [write_json_atomic(plan.out / "compare.json", summary),
             write_text_atomic(plan.out / "compare.md", markdown)]
    rows = [row for row in summary["variants"] if row["accuracy_mean"] is not None]
    if rows:
        curves = {row["name"]: [load_result(plan.run_path(row["name"], seed))["losses"]
                                for seed in row["seeds_finished"]] for row in rows}
        base = summary["base"]
        files.append(plots.plot_comparison(
            [(row["name"], row["trainable_params"], row["accuracy_mean"],
              *row["accuracy_ci95"]) for row in rows],
            curves, plan.out / "compare.png",
            base_accuracy=None if base is None else base["accuracy"],
            title=f"moa compare: {Path(summary['eval_data']).name}"))
    return files


__all__ = ["COLLAPSE_SHARE", "format_table", "routing_summary", "summarize", "write_summary"]
