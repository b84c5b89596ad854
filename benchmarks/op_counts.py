"""Aten ops per decoder layer in one training step (forward + backward) and one decoding
step, per preset, against PEFT LoRA r=16 and the frozen model: what a GPU pays as kernel
launches, measured on the CPU.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/op_counts.py [--presets soft_moa,lora]
        [--decode] [--list soft_moa]

Every aten op that reaches the dispatcher below autograd is recorded (`OpRecorder`, a
TorchDispatchMode), views excluded (no kernel).
Per decoder layer = (ops of the 2-layer tiny Llama of tests/moa/tiny.py) - (ops of the
same model with 1 layer): what one more decoder layer adds, the embeddings, head and loss
cancelling out. A training step runs once, then an optimizer step changes every trainable
tensor (so what is cached per parameter version is made again, as in training), then the
counted step runs on fresh inputs of the same shape; the optimizer step itself is not
counted (PEFT and MoA run the same foreach optimizer over their tensors). A decoding step
is counted after one uncounted step, inside the contexts of MoAModel.generate.

--list PRESET prints the per-layer op histogram of that preset (most frequent first),
the starting point for cutting; --origins PRESET the same per origin: a backward op by its
autograd node and the source line of the forward that made the node (anomaly mode records
it), a forward op by the innermost source line of moa, moa_kernels or the model.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH

PRESETS = ("soft_moa", "sparse_moa", "instance_moa", "unipeft", "lora", "molora",
           "hydralora", "adamole", "topk_moelora")


class OpRecorder(TorchDispatchMode):
    """Records every aten op called while it is active (below autograd: the forward's ops
    and the backward's), as the OpOverload. `counts(views=False)` leaves out the ops that
    return views (no kernel runs for them)."""

    def __init__(self, origins: bool = False) -> None:
        super().__init__()
        self.ops: list[torch._ops.OpOverload] = []
        self.origins: list[str] | None = [] if origins else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        if self.origins is not None:
            self.origins.append(_origin())
        return func(*args, **(kwargs or {}))

    def counts(self, views: bool = True) -> collections.Counter:
        """{op name: calls}, e.g. {"aten.mm.default": 12}; with origins, keyed
        "op  <- origin"."""
        names = [str(op) for op in self.ops]
        if self.origins is not None:
            names = [f"{name}  <- {origin}" for name, origin in zip(names, self.origins)]
        return collections.Counter(name for name, op in zip(names, self.ops)
                                   if views or not is_view(op))


@functools.cache
def _package_folders() -> tuple[str, ...]:
    """The folders of the moa and moa_kernels this process imported, each ending in "/"."""
    import moa
    import moa_kernels

    return tuple(str(Path(package.__file__).parent) + "/" for package in (moa, moa_kernels))


def _source_line(frames) -> str:
    """The innermost frame of moa, moa_kernels or a transformers model (past the shared
    `apply_function`), as path:line (moa/..., moa_kernels/..., transformers/...)."""
    ours = _package_folders()
    frames = [f for f in frames
              if (f.filename.startswith(ours) or "/transformers/models/" in f.filename)
              and not f.filename.endswith("autograd_apply.py")]
    if not frames:
        return "?"
    frame = frames[-1]
    path = frame.filename
    for folder in ours:
        if path.startswith(folder):
            path = Path(folder).name + "/" + path[len(folder):]
            break
    else:
        path = path.split("site-packages/")[-1]
    return f"{path}:{frame.lineno} {frame.name}"


def _origin() -> str:
    """Where the op being dispatched comes from: the autograd node running it and its
    forward's source line (the node's anomaly-mode traceback), or the forward's source."""
    node = torch._C._current_autograd_node()
    if node is None:
        return "forward " + _source_line(traceback.extract_stack()[:-2])
    stack = node.metadata.get("traceback_")
    frames = traceback.extract_stack()[:0]
    if stack:
        text = "".join(stack) if isinstance(stack, list) else str(stack)
        frames = [traceback.FrameSummary(line.split('"')[1], int(line.split("line ")[1]
                                         .split(",")[0]), line.rsplit(" in ", 1)[1])
                  for line in text.splitlines() if line.strip().startswith('File "')]
    return f"backward {node.name()} of {_source_line(frames)}"


# Ops that return a new tensor header over an input's storage without running a kernel,
# though their schema does not mark them as views.
ALIASING_OPS = frozenset({"aten._unsafe_view.default"})


def is_view(op: torch._ops.OpOverload) -> bool:
    """Whether op returns a view of an input (an alias that no kernel computes)."""
    return bool(getattr(op, "is_view", False)) or str(op) in ALIASING_OPS


def build(name: str, layers: int) -> torch.nn.Module:
    """"frozen", "peft_lora" (r=16 on q, k, v, o, down) or a preset, on the tiny Llama."""
    from tests.moa.tiny import tiny_llama

    model = tiny_llama(num_hidden_layers=layers)
    if name == "frozen":
        return model.requires_grad_(False)
    if name == "peft_lora":
        import warnings

        from peft import LoraConfig, get_peft_model

        from moa.config import PAPER_TARGETS

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                    target_modules=list(PAPER_TARGETS)))
    from moa import MoAConfig, get_moa_model

    moa = get_moa_model(model, MoAConfig.preset(name))
    moa.train()
    return moa


def _ids(seed: int) -> torch.Tensor:
    from tests.moa.tiny import token_batch

    return token_batch(2, 9, seed=seed)


def training_step_ops(name: str, layers: int, origins: bool = False) -> collections.Counter:
    """The aten ops (views excluded) of one forward + backward of `name` with `layers`
    decoder layers, after one unrecorded step; with origins, keyed by op and origin."""
    model = build(name, layers)
    frozen = name == "frozen"

    def step(ids, optimizer):
        if frozen:  # backpropagate to the embeddings: the work every adapted model does too
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, labels=ids).loss.backward()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()  # the weights change between steps, as in training
        for parameter in model.parameters():
            parameter.grad = None

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3) if trainable else None
    step(_ids(1), optimizer)
    anomaly = torch.autograd.set_detect_anomaly(True, check_nan=False) if origins else \
        contextlib.nullcontext()
    with anomaly, OpRecorder(origins) as recorder:
        step(_ids(2), None)
    return recorder.counts(views=False)


def decode_step_ops(name: str, layers: int) -> collections.Counter:
    """The aten ops of one cached decoding step (one new token per sequence, no grad)."""
    import contextlib

    from moa import MoAModel
    from moa.modules.layer_router import instance_gate_reuse
    from moa.modules.prompt import prompt_key_cache

    model = build(name, layers)
    model.eval()
    ids = _ids(1)
    generating = contextlib.ExitStack()
    if isinstance(model, MoAModel):  # what MoAModel.generate holds over a generate call
        generating.enter_context(prompt_key_cache(model.model))
        generating.enter_context(instance_gate_reuse(model.model, model._injection.context))
    with torch.no_grad(), generating:
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        step = ids[:, -1:]
        out = model(input_ids=step, past_key_values=cache, use_cache=True)  # unrecorded
        cache = out.past_key_values
        with OpRecorder() as recorder:
            model(input_ids=step, past_key_values=cache, use_cache=True)
    return recorder.counts(views=False)


def per_layer(counter_of, name: str) -> collections.Counter:
    """counter_of(name, 2) - counter_of(name, 1), per op (negative counts kept)."""
    two, one = counter_of(name, 2), counter_of(name, 1)
    difference = collections.Counter()
    for op in set(two) | set(one):
        if two[op] != one[op]:
            difference[op] = two[op] - one[op]
    return difference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--decode", action="store_true", help="count a decoding step too")
    one_preset = parser.add_mutually_exclusive_group()
    one_preset.add_argument("--list", metavar="PRESET", help="print one preset's op histogram")
    one_preset.add_argument("--origins", metavar="PRESET",
                            help="print one preset's ops per layer by where they come from")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.list or args.origins:
        name = args.list or args.origins
        counts = per_layer(lambda n, layers: training_step_ops(n, layers, bool(args.origins)),
                           name)
        print(f"{name}: {sum(counts.values())} ops per decoder layer (training step)")
        for op, count in sorted(counts.items(), key=lambda item: (
                item[0].split("<- ")[-1], item[0])) if args.origins else counts.most_common():
            print(f"  {count:4d}  {op}")
        return
    names = ["frozen", "peft_lora", *args.presets.split(",")]
    train = {name: sum(per_layer(training_step_ops, name).values()) for name in names}
    decode = {name: sum(per_layer(decode_step_ops, name).values()) for name in names} \
        if args.decode else {}
    header = f"{'variant':14s} {'train ops':>9s} {'x PEFT':>7s}"
    if decode:
        header += f" {'decode ops':>10s} {'x PEFT':>7s}"
    print("aten ops per decoder layer (views excluded), tiny Llama (tests/moa/tiny.py)")
    print(header)
    for name in names:
        line = f"{name:14s} {train[name]:9d} {train[name] / train['peft_lora']:7.2f}"
        if decode:
            line += f" {decode[name]:10d} {decode[name] / decode['peft_lora']:7.2f}"
        print(line)


if __name__ == "__main__":
    main()
