"""`moa demo`: the main job, end to end on an embedded default that needs no download.

A small Llama-architecture model is built from a config (random frozen weights), a preset is
injected, and the adapters learn a synthetic next-token task the demo generates: each
sequence counts upwards by a stride drawn per sequence (x[t+1] = x[t] + stride mod V), so
the next token depends on the context, not only the current token. The demo prints the loss
at intervals, the trainable parameter count and a router statistics table, saves the
adapter, reloads it into a fresh copy of the base model and checks the outputs match, and
writes PNG plots (loss curve; per-layer x expert mean gate and activation rate).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from moa.cli.options import (
    Option,
    checkpoint_path,
    flag,
    options_dataclass,
    positive_int,
    seed,
    text,
    torch_device,
)
from moa.cli.tiny_models import TinyLlama, build_tiny_llama
from moa.config import PRESETS
from moa.stats import format_router_stats, short_router_name

DEMO_VOCAB = 16
DEMO_STRIDES = (1, 2, 3)
DEMO_HEAD_SCALE = 5.0
DEMO_MODEL = TinyLlama(vocab=DEMO_VOCAB, hidden=64, intermediate=172, layers=4, heads=4,
                       kv_heads=2, max_positions=128, head_scale=DEMO_HEAD_SCALE)

DEMO_OPTIONS: tuple[Option, ...] = (
    Option("preset", text, "soft_moa", "MoAConfig preset to inject", choices=tuple(PRESETS)),
    Option("steps", positive_int, 200, "training steps"),
    Option("model", checkpoint_path, None, "a local transformers causal-LM checkpoint "
           "directory or a .gguf file (default: an embedded 4-layer Llama built from a "
           "config)"),
    Option("out", text, "moa-demo", "output directory; one that holds another run is "
           "refused unless --overwrite is given"),
    Option("overwrite", flag, False, "replace the run already in --out (a demo's or a moa "
           "train run's entries are removed: adapter/, checkpoints/, the logs and the plots; "
           "nothing else)"),
    Option("device", torch_device, "cpu", "cpu, cuda or cuda:N"),
    Option("seed", seed, 0, "seed of the model and the data"),
)


@options_dataclass(DEMO_OPTIONS)
class DemoOptions:
    """What `moa demo` runs with: a keyword field per DEMO_OPTIONS entry."""


def loss_references(length: int, vocab: int) -> dict[str, float]:
    """Cross-entropy (nats) of guessing uniformly, and the best possible on counting
    sequences: only the token after the first is uncertain (which stride)."""
    return {"chance": math.log(vocab),
            "best possible": math.log(len(DEMO_STRIDES)) / (length - 1)}


@dataclass
class DemoResult:
    """What `run_demo` did: the loss per step, the trainable parameter count, the largest
    output difference after the save/reload round trip (0 when exact), the output folder
    and the files written there, and the wall time."""

    losses: list[float]
    trainable_parameters: int
    reload_max_abs_difference: float
    output_dir: Path
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def build_demo_model(seed: int = 0):
    """The embedded default: DEMO_MODEL (a 4-layer Llama, hidden 64, 4 heads, 2 KV heads)
    from seed `seed` (the global RNG is left seeded: the adapters' initialisation follows)."""
    return build_tiny_llama(DEMO_MODEL, seed)


def load_model(path: str | None, seed: int):
    """A fresh base model: the embedded default (path None), a local checkpoint or a .gguf
    file (moa.cli.loading checks that it holds a model)."""
    if path is None:
        return build_demo_model(seed)
    from moa.cli.loading import is_gguf, load_base_model

    if is_gguf(path):
        return load_base_model(path)
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path).eval()
    except Exception as error:  # corrupt weights, unknown architecture, ...: one clear line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"cannot load the checkpoint {path!r}: {type(error).__name__}: "
                         f"{reason}") from error


def check_output_dir(out_dir: str | Path) -> None:
    """Raise OSError, before any work, when the demo could not write its outputs into
    out_dir: a folder it needs is a file, or a file it writes is a folder."""
    from moa.config import CONFIG_NAME
    from moa.model import WEIGHTS_NAME

    out_dir = Path(out_dir)
    for folder in (*reversed(out_dir.parents), out_dir, out_dir / "adapter"):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"cannot write the demo's outputs into {out_dir}: "
                                     f"{folder} is a file, not a directory")
    for name in ("loss.png", "mean_gate.png", "active_rate.png", f"adapter/{CONFIG_NAME}",
                 f"adapter/{WEIGHTS_NAME}"):
        if (out_dir / name).is_dir():
            raise IsADirectoryError(f"cannot write the demo's output {out_dir / name}: it is "
                                    f"a directory; remove it or choose another --out")


def check_no_other_run(out_dir: str | Path, model_path: str | None, overwrite: bool
                       ) -> list[str]:
    """The checks on out_dir that need nothing loaded: it is not the --model checkpoint nor
    holds it, and it holds no other run (see moa.cli.outputs) unless `overwrite`; the entries of
    the run to replace (empty unless overwrite)."""
    from moa.cli.outputs import check_not_an_input, describe_entries, previous_run

    check_not_an_input(out_dir, {"--model": model_path})
    found = previous_run(out_dir)
    if found and not overwrite:
        raise ValueError(f"--out {out_dir} holds another run "
                         f"({describe_entries(out_dir, found)}): replace it with --overwrite, "
                         "or choose another --out")
    return found


def counting_batch(batch: int, length: int, vocab: int, generator: torch.Generator):
    """[batch, length] int64: per row a random start and stride, counting mod vocab."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    stride = torch.tensor(DEMO_STRIDES)[torch.randint(0, len(DEMO_STRIDES), (batch, 1),
                                                      generator=generator)]
    return (start + stride * torch.arange(length)) % vocab


def _stats_matrices(stats) -> tuple[list[str], list[str], list[list[float]], list[list[float]]]:
    """Rows (routers), expert names, mean gates and active fractions from router_stats()."""
    rows, experts, mean_gate, active = [], [], [], []
    for name, entry in stats.items():
        rows.append(short_router_name(name))
        experts = max(experts, list(entry["experts"]), key=len)
        mean_gate.append([float(v) for v in entry["mean_gate"]])
        active.append([float(v) for v in entry["active_fraction"]])
    width = max((len(r) for r in mean_gate), default=0)
    pad = lambda matrix: [r + [float("nan")] * (width - len(r)) for r in matrix]  # noqa: E731
    return rows, experts, pad(mean_gate), pad(active)


def run_demo(preset: str = "soft_moa", steps: int = 200, model_path: str | None = None,
             out_dir: str | Path = "moa-demo", device: str = "cpu", seed: int = 0,
             batch: int = 16, length: int = 32, learning_rate: float = 1e-2,
             log=print, progress: bool = True, overwrite: bool = False) -> DemoResult:
    """`moa demo`: inject `preset` into the embedded model (or the checkpoint at
    model_path), train it `steps` steps of AdamW at `learning_rate` on counting sequences
    [batch, length], print the loss, the parameter count and the router statistics through
    `log`, save and reload the adapter (checking the outputs match), and write the plots
    into out_dir. progress: show a tqdm bar. An out_dir holding another run (moa demo's or
    moa train's) is refused before anything loads, unless `overwrite`: then that run's
    entries are removed once the model has loaded."""
    from moa.cli import plots
    from moa.cli.outputs import check_writable, describe_entries, remove_previous_run
    from moa.config import MoAConfig
    from moa.model import MoAModel, get_moa_model

    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    replaced = check_no_other_run(out_dir, model_path, overwrite)
    check_writable(out_dir)
    device = torch.device(device)
    model = get_moa_model(load_model(model_path, seed).to(device), MoAConfig.preset(preset))
    if replaced:
        log(f"--overwrite: replacing the run in {out_dir} (removing "
            f"{describe_entries(out_dir, replaced)})")
        remove_previous_run(out_dir)
    vocab = min(DEMO_VOCAB, model.config.vocab_size)
    trainable = model.trainable_parameter_count()
    log(f"preset {preset}")
    model.print_trainable_parameters()
    references = loss_references(length, vocab)
    log("task: continue counting sequences mod {} (stride 1, 2 or 3 per sequence); loss in "
        "nats: chance {:.3f}, best possible {:.3f}".format(vocab, references["chance"],
                                                         references["best possible"]))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    log_every = max(1, steps // 10)
    model.train()
    bar = tqdm(range(steps), desc="training", disable=not progress, unit="step",
               mininterval=0.5)
    for step in bar:
        ids = counting_batch(batch, length, vocab, generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % log_every == 0 or step == steps - 1:
            tqdm.write(f"step {step:4d}  loss {losses[-1]:.4f}") if progress else \
                log(f"step {step:4d}  loss {losses[-1]:.4f}")
    model.eval()

    probe = counting_batch(4, length, vocab, generator).to(device)
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        stats = model.router_stats()
    log("router statistics on a held-out batch:")
    log(format_router_stats(stats) if stats else "(this preset has no router)")

    adapter_dir = out_dir / "adapter"
    try:
        model.save_pretrained(adapter_dir)
    except SafetensorError as error:  # not an OSError, even for "Permission denied"
        raise OSError(f"cannot save the adapter into {adapter_dir}: {error}") from error
    reloaded = MoAModel.from_pretrained(load_model(model_path, seed).to(device), adapter_dir)
    reloaded.eval()
    with torch.no_grad():
        actual = reloaded(input_ids=probe).logits
    difference = (actual - expected).abs().max().item()
    if not torch.equal(actual, expected):
        raise RuntimeError(f"reloaded adapter gives different outputs (max abs difference "
                           f"{difference:.3e})")
    log(f"saved to {adapter_dir}; reloaded outputs match exactly")

    files = [plots.plot_loss_curve(range(steps), losses, out_dir / "loss.png",
                                   title=f"moa demo: {preset}", references=references)]
    if stats:
        rows, experts, mean_gate, active = _stats_matrices(stats)
        files.append(plots.plot_heatmap(mean_gate, rows, experts, out_dir / "mean_gate.png",
                                        f"{preset}: mean gate per router and expert",
                                        "mean gate"))
        if any(entry["mode"] != "soft" for entry in stats.values()):
            files.append(plots.plot_heatmap(
                active, rows, experts, out_dir / "active_rate.png",
                f"{preset}: fraction of tokens each expert runs on", "active fraction",
                value_range=(0.0, 1.0)))
    log("plots: " + ", ".join(str(f) for f in files))
    return DemoResult(losses, trainable, difference, out_dir, files,
                      time.perf_counter() - started)
