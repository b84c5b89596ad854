"""Benchmarks behind `moa bench`, measured as ratios within one run: layers (a MoALinear
against its frozen base), a training step and greedy decoding of a Llama-shaped model
against PEFT LoRA (with peak memory from a fresh subprocess), and `run_bench`.

Compiled beside eager (`compile_benchmark`, and the decode benchmark's compiled rows):
torch.compile(model, fullgraph=True) for the training step, and transformers' own compiled
decoding (static KV cache, compile_config with fullgraph=True) for `generate`, each with
the time of its first call (the compilation; inductor's on-disk cache may hold some of it
from an earlier run) and peak memory beside each step time.

Peak memory on the CPU is the rise of the peak resident set over one step, in a fresh
process whose glibc serves every allocation of 64 KiB or more by mmap (MALLOC_MMAP_THRESHOLD_
fixed at 65536): freed tensors go back to the system at once, so the peak resident set is
the peak of live memory. With glibc's default (a threshold that grows as memory is freed)
freed blocks stay resident and the figure depends on what the process allocated and freed
before the step (building the model): two variants with the same live peak can differ by
hundreds of MB.

The training step also runs on a bitsandbytes nf4 base (variants ending in "+nf4": the
bench's own model saved and loaded back with a 4-bit quantization_config, compute dtype
fp32): soft_moa against PEFT LoRA r=16 on the same 4-bit base. Those rows are skipped, with
the reason printed, where bitsandbytes is not installed.

Layer shapes:
    L1: nn.Linear(2048, 2048) frozen, T = 2048, experts lora:8, lora:16, lora:32, adapter:16,
        swiglu router x4, soft mode.
    M8: the same base, 8 x lora:16, softmax gate; soft mode against topk k=2.

Every case is timed in interleaved rounds (base, case, base, case, ...). Times are medians
over rounds; a ratio is the median over rounds of the ratio within each round, so drift and
bursts of load from elsewhere on the machine cancel out.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moa.cli.options import Option, flag, options_dataclass, positive_int, text, torch_device
from moa.cli.tiny_models import TinyLlama, build_tiny_llama
from moa.config import RouterConfig
from moa.modules.linear import MoALinear

BENCH_OPTIONS: tuple[Option, ...] = (
    Option("quick", flag, False, "small shapes, no compiled memory workers: 1.5-4 minutes on 2 "
           "CPU cores (less with a warm inductor cache)"),
    Option("out", text, "bench-out", "directory for CSV and PNG"),
    Option("device", torch_device, "cpu", "cpu, cuda or cuda:N"),
    Option("rounds", positive_int, None, "timing rounds per benchmark (default: 7 for layers, "
           "5 for the model and decode benchmarks; 3 each with --quick)"),
)


@options_dataclass(BENCH_OPTIONS)
class BenchOptions:
    """What `moa bench` runs with: a keyword field per BENCH_OPTIONS entry."""


@dataclass(frozen=True)
class LayerCase:
    name: str
    experts: tuple[str, ...]
    router: RouterConfig


L1 = LayerCase("L1 soft", ("lora:8", "lora:16", "lora:32", "adapter:16"), RouterConfig())
M8_SOFT = LayerCase("M8 soft", ("lora:16",) * 8, RouterConfig(gate="softmax"))
M8_TOPK = LayerCase("M8 topk2", ("lora:16",) * 8,
                    RouterConfig(gate="softmax", mode="topk", top_k=2))
LAYER_CASES = (L1, M8_SOFT, M8_TOPK)


@dataclass
class Timing:
    case: str
    backend: str
    forward_ms: float
    fwd_bwd_ms: float  # forward + backward (x requires grad, base frozen)
    forward_ratio: float  # over the frozen base layer alone
    fwd_bwd_ratio: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def run(fn: Callable[[], None]) -> float:
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        return time.perf_counter() - start
    return run


def interleaved_samples(functions: dict[str, Callable[[], None]], rounds: int,
                        device: torch.device, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each function in each of `rounds` rounds, after warm-up. Every round runs
    each function once, in the given order in even rounds and in reverse in odd ones, so
    that no function always runs right after the same neighbour (on a shared CPU a timing
    can depend on what ran just before it)."""
    timer = _timer(device)
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    order = list(functions.items())
    for round_index in range(rounds):
        for name, fn in order if round_index % 2 == 0 else reversed(order):
            samples[name].append(timer(fn))
    return samples


def median_time(samples: dict[str, list[float]], name: str) -> float:
    return statistics.median(samples[name])


def median_ratio(samples: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of samples[name] / samples[reference] within the same round."""
    if reference not in samples:
        return float("nan")
    return statistics.median(a / b for a, b in zip(samples[name], samples[reference]))


def ratio_range(samples: dict[str, list[float]], name: str,
                reference: str) -> tuple[float, float]:
    """(lowest, highest) over rounds of samples[name] / samples[reference] within a round."""
    if reference not in samples:
        return float("nan"), float("nan")
    ratios = [a / b for a, b in zip(samples[name], samples[reference])]
    return min(ratios), max(ratios)


def _step_functions(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor):
    def forward() -> None:
        with torch.no_grad():
            module(x)

    def train() -> None:
        x.grad = None
        module(x).backward(grad_y)

    return forward, train


def layer_benchmark(backends: list[str], *, tokens: int = 2048, features: int = 2048,
                    rounds: int = 7, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32,
                    cases: tuple[LayerCase, ...] = LAYER_CASES, seed: int = 0) -> list[Timing]:
    """Time every case x backend against the frozen base layer alone, interleaved."""
    device = torch.device(device)
    torch.manual_seed(seed)
    base = nn.Linear(features, features, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, features, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(tokens, features, device=device, dtype=dtype)
    functions, labels = {}, {}
    functions["base/forward"], functions["base/train"] = _step_functions(base, x, grad_y)
    for case in cases:
        for backend in backends:
            layer = MoALinear(base, list(case.experts), case.router, backend=backend)
            with torch.no_grad():  # B starts at zero; give the experts real work
                layer.expand_weight.normal_(0.0, 0.02)
            key = f"{case.name}/{backend}"
            labels[key] = (case.name, backend)
            functions[f"{key}/forward"], functions[f"{key}/train"] = _step_functions(
                layer, x, grad_y)
    samples = interleaved_samples(functions, rounds, device)
    rows = [Timing("base", "-", median_time(samples, "base/forward") * 1e3,
                   median_time(samples, "base/train") * 1e3, 1.0, 1.0)]
    for key, (case, backend) in labels.items():
        rows.append(Timing(case, backend, median_time(samples, f"{key}/forward") * 1e3,
                           median_time(samples, f"{key}/train") * 1e3,
                           median_ratio(samples, f"{key}/forward", "base/forward"),
                           median_ratio(samples, f"{key}/train", "base/train")))
    return rows


def overhead_ratio(rows: list[Timing], sparse_case: str, dense_case: str, backend: str,
                   train: bool) -> float:
    """(sparse - base) / (dense - base) for one backend: the M8 target (from the median
    ratios over the base, so the base time cancels)."""
    pick = {(r.case, r.backend): r for r in rows}
    attribute = "fwd_bwd_ratio" if train else "forward_ratio"
    sparse = getattr(pick[(sparse_case, backend)], attribute) - 1.0
    dense = getattr(pick[(dense_case, backend)], attribute) - 1.0
    return sparse / dense


def text_table(rows: list, columns: list[tuple[str, int, str, str]]) -> str:
    """A fixed-width text table: columns are (header, width, format spec, attribute); the
    first column is left-aligned, the others right-aligned."""
    lines = [" ".join(f"{header:{'<' if i == 0 else '>'}{width}s}"
                      for i, (header, width, _, _) in enumerate(columns))]
    for row in rows:
        lines.append(" ".join(format(getattr(row, attribute), f"{width}{spec}")
                              for _, width, spec, attribute in columns))
    return "\n".join(lines)


def format_layer_table(rows: list[Timing]) -> str:
    return text_table(rows, [("case", 10, "s", "case"), ("backend", 9, "s", "backend"),
                             ("fwd ms", 9, ".2f", "forward_ms"),
                             ("fwd x", 7, ".3f", "forward_ratio"),
                             ("fwd+bwd ms", 11, ".2f", "fwd_bwd_ms"),
                             ("fwd+bwd x", 9, ".3f", "fwd_bwd_ratio")])


# ---------------------------------------------------------------------------------------
# model level: one training step and decoding, against PEFT LoRA and the frozen model
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    sequence: int


MODEL_FULL = ModelShape(512, 8, 1376, 8, 4, 4096, 8, 256)
MODEL_QUICK = ModelShape(128, 2, 344, 4, 2, 512, 2, 64)
MOA_VARIANTS = (("soft_moa", "torch"), ("soft_moa", "reference"), ("sparse_moa", "torch"),
                ("sparse_moa", "reference"), ("molora", "torch"), ("hydralora", "torch"),
                ("adamole", "torch"), ("topk_moelora", "torch"))


def _triton_variants(device: torch.device) -> tuple[str, ...]:
    """The triton-backend variants, where they can run (CUDA with triton installed)."""
    from moa.modules.dispatch import triton_available

    if device.type == "cuda" and triton_available():
        return ("soft_moa/triton", "sparse_moa/triton")
    return ()


def build_llama(shape: ModelShape, device: torch.device, seed: int = 0):
    """The benchmark's Llama of `shape` (random weights from `seed`, LlamaConfig's special
    tokens) on `device`, in training mode; the global RNG is left seeded."""
    spec = TinyLlama(vocab=shape.vocab, hidden=shape.hidden, intermediate=shape.intermediate,
                     layers=shape.layers, heads=shape.heads, kv_heads=shape.kv_heads,
                     max_positions=max(512, shape.sequence))
    return build_tiny_llama(spec, seed).to(device).train()


NF4 = "+nf4"  # the suffix of a variant on a bitsandbytes nf4 base
NF4_VARIANTS = ("peft_lora" + NF4, "soft_moa/torch" + NF4)
_checkpoints: dict[tuple[ModelShape, int], str] = {}


def nf4_unavailable() -> str | None:
    """Why the nf4 rows cannot run here, or None when they can."""
    import importlib

    for package in ("bitsandbytes", "accelerate"):  # from_pretrained's device_map needs both
        try:
            importlib.import_module(package)
        except ImportError as error:
            return f"{package} cannot be imported ({error}); pip install bitsandbytes accelerate"
    return None


class _QuietLoading:
    """Without transformers' progress bars (saving and loading shards), restored after."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self.enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc) -> None:
        from transformers.utils import logging as hf_logging

        if self.enabled:
            hf_logging.enable_progress_bar()


def _checkpoint(shape: ModelShape, seed: int) -> str:
    """A directory holding build_llama(shape, seed) saved with save_pretrained (one per
    process, removed at exit)."""
    key = (shape, seed)
    if key not in _checkpoints:
        import atexit
        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="moa-bench-llama-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        with _QuietLoading():
            build_llama(shape, torch.device("cpu"), seed).save_pretrained(directory)
        _checkpoints[key] = directory
    return _checkpoints[key]


def build_llama_nf4(shape: ModelShape, device: torch.device, seed: int = 0):
    """build_llama's model with its linears (not lm_head) as bitsandbytes nf4 Linear4bit,
    loaded as from_pretrained(quantization_config=...) builds a 4-bit model; fp32 compute."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32)
    directory = _checkpoint(shape, seed)
    with _QuietLoading():
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config,
                                                     device_map=str(device),
                                                     dtype=torch.float32)
    quantized = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes (0.50.2) repacks 4-bit weights on the
            # first no-grad eval call, which fails for some shapes and rounds differently:
            # keep every CPU on the one portable kernel, so the rows compare across machines.
            module.support_avx512bf16_for_cpu = False
            quantized += 1
    if quantized == 0:
        raise RuntimeError("the 4-bit load produced no bitsandbytes Linear4bit layer")
    return model.train()  # from_pretrained returns eval mode; build_llama's model trains


def build_variant(name: str, shape: ModelShape, device: torch.device, seed: int = 0):
    """(model, trainable parameter count) for "frozen", "peft_lora" or "PRESET/BACKEND",
    each optionally with the suffix "+nf4" (on a bitsandbytes nf4 base)."""
    if name.endswith(NF4):
        name = name[:-len(NF4)]
        model = build_llama_nf4(shape, device, seed)
    else:
        model = build_llama(shape, device, seed)
    if name == "frozen":
        model.requires_grad_(False)
        return model, 0
    if name == "peft_lora":
        from peft import LoraConfig, get_peft_model

        from moa.config import PAPER_TARGETS

        with warnings.catch_warnings():  # peft asks transformers for a deprecated property
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=list(PAPER_TARGETS)))
    else:
        from moa.config import MoAConfig
        from moa.model import get_moa_model

        preset, backend = name.split("/")
        model = get_moa_model(model, MoAConfig.preset(preset, backend=backend))
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_step(model, shape: ModelShape, device: torch.device, seed: int = 0,
                  trainable_of: nn.Module | None = None, optimize: bool = True):
    """A closure running one training step: forward with labels, backward, AdamW step. The
    frozen model has no trainable tensor, so its step backpropagates to the input embeddings
    (the work every adapted model also does) and skips the optimiser. model may be a
    torch.compile'd module (then trainable_of: the module it wraps). optimize=False: forward
    and backward only, the gradients dropped after (what compiles a model without creating
    an optimiser state)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.sequence), generator=generator)
    ids = ids.to(device)
    trainable = [p for p in (trainable_of or model).parameters() if p.requires_grad]
    if not trainable:
        embeddings = model.get_input_embeddings()

        def frozen_step() -> None:
            inputs = embeddings(ids).detach().requires_grad_(True)
            model(inputs_embeds=inputs, labels=ids).loss.backward()

        return frozen_step
    if not optimize:
        def forward_backward() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            for parameter in trainable:
                parameter.grad = None

        return forward_backward
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _process_status_mb(field_name: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field_name} in /proc/self/status")


def measure_step_memory(name: str, shape: ModelShape, device: torch.device,
                        compiled: bool = False, backend: str = "inductor") -> float:
    """Peak memory (MB) the first training step adds to the built model: activations,
    gradients and the AdamW state. compiled: the model under torch.compile(fullgraph=True),
    compiled first by a forward and backward whose gradients are dropped, so that the
    measured step creates the gradients and the AdamW state as the eager one does.

    CUDA: max_memory_allocated over the step. CPU: the rise of the process's peak resident
    set (its high-water mark is reset after the model is built, Linux /proc/self/clear_refs),
    so run this in a fresh process per variant (`python -m moa.cli.bench --memory-worker NAME`,
    which `_memory_in_subprocess` starts with glibc's mmap threshold fixed: see the module
    docstring).
    """
    model, _ = build_variant(name, shape, device)
    run = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
    step = training_step(run, shape, device, trainable_of=model)
    if compiled:
        training_step(run, shape, device, trainable_of=model, optimize=False)()  # compiles
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - held) / 2**20
    held = _process_status_mb("VmRSS")
    if not _reset_peak_rss():
        return float("nan")
    step()
    return _process_status_mb("VmHWM") - held


MEMORY_WORKER_TIMEOUT_S = 1800  # a compiled worker compiles the full model first
# glibc: serve every allocation of 64 KiB or more by mmap, returned at free (module docstring)
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _memory_in_subprocess(name: str, quick: bool, device: torch.device,
                          compiled: bool = False, backend: str = "inductor") -> float:
    import json
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "moa.cli.bench", "--memory-worker", name,
               "--device", str(device)] + (["--quick"] if quick else []) + \
        (["--compile", backend] if compiled else [])
    try:
        completed = subprocess.run(command, capture_output=True, text=True, check=False,
                                   timeout=MEMORY_WORKER_TIMEOUT_S,
                                   env={**os.environ, **MEMORY_WORKER_ENV})
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"memory worker for {name} did not finish within "
                           f"{MEMORY_WORKER_TIMEOUT_S} s") from error
    if completed.returncode != 0:
        raise RuntimeError(f"memory worker for {name} failed: {completed.stderr.strip()[-500:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_mb"]


@dataclass
class ModelTiming:
    variant: str
    trainable: int
    step_ms: float
    ratio_to_peft: float
    ratio_to_frozen: float
    peak_mb: float
    ratio_to_peft_low: float = float("nan")  # the range over rounds of the ratio to PEFT
    ratio_to_peft_high: float = float("nan")


def _reference(name: str, reference: str) -> str:
    """The reference variant a row's ratio is taken against: on the same base as the row."""
    return reference + NF4 if name.endswith(NF4) else reference


def model_benchmark(quick: bool = False, device: str | torch.device = "cpu",
                    rounds: int | None = None, memory: bool = True,
                    variants: tuple[str, ...] | None = None, log=print) -> list[ModelTiming]:
    """Training-step time (interleaved medians) and peak memory of every variant, all timed
    in the same interleaved rounds. "x PEFT" and "x frozen" of a "+nf4" row are against
    peft_lora+nf4 and frozen+nf4 (nan where that variant is not run); in quick mode the
    "+nf4" rows have no peak memory (nan)."""
    device = torch.device(device)
    shape = MODEL_QUICK if quick else MODEL_FULL
    rounds = rounds or (3 if quick else 5)
    names = variants or ("frozen", "peft_lora", *(f"{p}/{b}" for p, b in MOA_VARIANTS),
                         *_triton_variants(device), *NF4_VARIANTS)
    if any(name.endswith(NF4) for name in names) and (reason := nf4_unavailable()):
        log(f"skipping the 4-bit (+nf4) training-step rows: {reason}")
        names = tuple(name for name in names if not name.endswith(NF4))
    steps, counts = {}, {}
    for name in names:
        model, counts[name] = build_variant(name, shape, device)
        steps[name] = training_step(model, shape, device)
    samples = interleaved_samples(steps, rounds, device)
    rows = []
    for name in names:
        # Quick mode leaves out the 4-bit rows' memory workers (about 10 s each, most of it
        # imports): their peak MB is nan there.
        measure = memory and not (quick and name.endswith(NF4))
        peak = _memory_in_subprocess(name, quick, device) if measure else float("nan")
        peft = _reference(name, "peft_lora")
        rows.append(ModelTiming(name, counts[name], median_time(samples, name) * 1e3,
                                median_ratio(samples, name, peft),
                                median_ratio(samples, name, _reference(name, "frozen")), peak,
                                *ratio_range(samples, name, peft)))
    return rows


def format_model_table(rows: list[ModelTiming]) -> str:
    lines = [f"{'variant':22s} {'trainable':>11s} {'step ms':>9s} {'x PEFT':>7s} "
             f"{'(rounds)':>13s} {'x frozen':>8s} {'peak MB':>8s}"]
    for r in rows:
        spread = f"{r.ratio_to_peft_low:.2f}-{r.ratio_to_peft_high:.2f}"
        lines.append(f"{r.variant:22s} {r.trainable:11,d} {r.step_ms:9.1f} "
                     f"{r.ratio_to_peft:7.3f} {spread:>13s} {r.ratio_to_frozen:8.3f} "
                     f"{r.peak_mb:8.1f}")
    return "\n".join(lines)


COMPILED_VARIANTS = ("peft_lora", "soft_moa/torch", "sparse_moa/torch")


@dataclass
class CompiledTiming:
    variant: str
    eager_ms: float  # training step, eager
    compiled_ms: float  # the same step under torch.compile(model, fullgraph=True)
    compile_s: float  # the first compiled step (tracing and compiling included)
    speedup: float  # eager / compiled, median over rounds
    eager_ratio_to_peft: float  # eager / eager PEFT LoRA
    compiled_ratio_to_peft: float  # compiled / compiled PEFT LoRA
    eager_peak_mb: float
    compiled_peak_mb: float


def compile_benchmark(quick: bool = False, device: str | torch.device = "cpu",
                      rounds: int | None = None, memory: bool = True,
                      variants: tuple[str, ...] = COMPILED_VARIANTS,
                      backend: str = "inductor") -> list[CompiledTiming]:
    """The training step of each variant eager and compiled (fullgraph), all in the same
    interleaved rounds, with compile time and (fresh subprocesses) peak memory of both."""
    device = torch.device(device)
    shape = MODEL_QUICK if quick else MODEL_FULL
    rounds = rounds or (3 if quick else 5)
    steps, compile_s = {}, {}
    for name in variants:
        for compiled in (False, True):
            model, _ = build_variant(name, shape, device)
            run = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
            step = training_step(run, shape, device, trainable_of=model)
            if compiled:
                start = time.perf_counter()
                step()
                _synchronize(device)
                compile_s[name] = time.perf_counter() - start
            steps[(name, compiled)] = step
    samples = interleaved_samples(steps, rounds, device)
    rows = []
    for name in variants:
        peaks = [_memory_in_subprocess(name, quick, device, compiled, backend) if memory
                 else float("nan") for compiled in (False, True)]
        eager, compiled = samples[(name, False)], samples[(name, True)]
        rows.append(CompiledTiming(
            name, statistics.median(eager) * 1e3, statistics.median(compiled) * 1e3,
            compile_s[name], median_ratio(samples, (name, False), (name, True)),
            median_ratio(samples, (name, False), ("peft_lora", False)),
            median_ratio(samples, (name, True), ("peft_lora", True)), *peaks))
    return rows


def format_compiled_table(rows: list[CompiledTiming]) -> str:
    return text_table(rows, [("variant", 18, "s", "variant"), ("eager ms", 9, ".1f", "eager_ms"),
                             ("peak MB", 8, ".1f", "eager_peak_mb"),
                             ("compiled ms", 11, ".1f", "compiled_ms"),
                             ("peak MB", 8, ".1f", "compiled_peak_mb"),
                             ("compile s", 9, ".1f", "compile_s"),
                             ("speed-up", 8, ".3f", "speedup"),
                             ("eager x PEFT", 12, ".3f", "eager_ratio_to_peft"),
                             ("compiled x PEFT", 15, ".3f", "compiled_ratio_to_peft")])


@dataclass
class DecodeTiming:
    variant: str  # "NAME" eager (dynamic cache), "NAME/compiled" (static cache, compiled)
    per_token_ms: float
    ratio_to_peft: float  # against PEFT LoRA decoding the same way
    call_ms: float = float("nan")  # the whole generate call (prefill and every new token)
    call_ratio_to_peft: float = float("nan")
    first_call_s: float = float("nan")  # compiled: the first call, compilation included


COMPILED = "/compiled"  # decode rows: static KV cache, decoding steps compiled


def decode_benchmark(quick: bool = False, device: str | torch.device = "cpu",
                     rounds: int | None = None, new_tokens: int = 32, prompt: int = 64,
                     batch: int = 4, compiled: bool = True,
                     names: tuple[str, ...] | None = None,
                     backend: str = "inductor") -> list[DecodeTiming]:
    """Greedy decoding with the KV cache: per-token latency of the decode phase, i.e.
    (time of generating new_tokens - time of generating 1) / (new_tokens - 1), and the time
    of the whole generate call (new_tokens). compiled: also a row "NAME/compiled" per
    variant (frozen left out), decoding with a static cache and transformers' compiled
    decoding steps (compile_config, fullgraph=True; the prefill runs eager), with the time
    of its first call."""
    from transformers import CompileConfig

    device = torch.device(device)
    shape = MODEL_QUICK if quick else MODEL_FULL
    rounds = rounds or (3 if quick else 5)
    names = names or ("frozen", "peft_lora", "soft_moa/torch", "sparse_moa/torch",
                      *_triton_variants(device))
    ids = torch.randint(0, shape.vocab, (batch, prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)
    functions, first_call, rows_of = {}, {}, []
    for name in names:
        model, _ = build_variant(name, shape, device)
        model.eval()
        for row in (name, name + COMPILED) if compiled and name != "frozen" else (name,):
            options = {}
            if row.endswith(COMPILED):
                config = CompileConfig(fullgraph=True, backend=backend,
                                       mode="default" if backend == "inductor" else None)
                config._compile_all_devices = True  # transformers compiles on CUDA only
                options = {"cache_implementation": "static", "compile_config": config}
            for count in (1, new_tokens):
                def generate(model=model, count=count, options=options) -> None:
                    with torch.no_grad():
                        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=count, min_new_tokens=count,
                                       do_sample=False, use_cache=True, pad_token_id=0,
                                       **options)
                if options and count == new_tokens:
                    start = time.perf_counter()
                    generate()
                    _synchronize(device)
                    first_call[row] = time.perf_counter() - start
                functions[(row, count)] = generate
            rows_of.append(row)
    samples = interleaved_samples(functions, rounds, device)
    per_round = {row: [(long - short) / (new_tokens - 1) for long, short in
                       zip(samples[(row, new_tokens)], samples[(row, 1)])] for row in rows_of}
    calls = {row: samples[(row, new_tokens)] for row in rows_of}

    def peft(row: str) -> str:
        return "peft_lora" + COMPILED if row.endswith(COMPILED) else "peft_lora"

    return [DecodeTiming(row, statistics.median(per_round[row]) * 1e3,
                         median_ratio(per_round, row, peft(row)),
                         statistics.median(calls[row]) * 1e3,
                         median_ratio(calls, row, peft(row)),
                         first_call.get(row, float("nan"))) for row in rows_of]


def format_decode_table(rows: list[DecodeTiming]) -> str:
    return text_table(rows, [("variant", 26, "s", "variant"),
                             ("ms/token", 9, ".2f", "per_token_ms"),
                             ("x PEFT", 7, ".3f", "ratio_to_peft"),
                             ("call ms", 9, ".1f", "call_ms"),
                             ("x PEFT", 7, ".3f", "call_ratio_to_peft"),
                             ("first call s", 12, ".1f", "first_call_s")])


def run_bench(quick: bool = False, out_dir: str | Path = "bench-out",
              device: str | torch.device = "cpu", rounds: int | None = None,
              log=print) -> dict[str, list]:
    """`moa bench`: layer, training-step and decoding benchmarks; tables, CSV and PNG."""
    import csv
    import platform
    from dataclasses import asdict

    from moa.cli import plots
    from moa.modules.dispatch import triton_available

    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backends = ["torch", "reference"] + (["triton"] if device.type == "cuda"
                                         and triton_available() else [])
    log(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, device {device}{' (quick)' if quick else ''}")
    if quick:
        log("quick mode: small shapes, a smoke test of the harness; per-call overheads weigh "
            "more than at full size, so its ratios are not comparable with benchmarks/"
            "RESULTS.md")
    log("ratios (x ...) are medians over interleaved rounds of the ratio within each round, "
        "so they need not equal the ratio of the median times shown beside them")
    size = 512 if quick else 2048
    layers = layer_benchmark(backends, tokens=size, features=size, device=device,
                             rounds=rounds or (3 if quick else 7))
    log(f"\nlayers (T = {size}, nn.Linear({size}, {size}), fp32; ratios over the base layer)")
    log(format_layer_table(layers))
    for backend in backends:
        log(f"[{backend}] M8 topk2 overhead / soft overhead: fwd+bwd "
            f"{overhead_ratio(layers, 'M8 topk2', 'M8 soft', backend, True):.2f}")
    models = model_benchmark(quick, device, rounds, log=log)
    log("\ntraining step (forward, backward, AdamW step)")
    if any(r.variant.endswith(NF4) for r in models):
        log("+nf4: on a bitsandbytes nf4 base (fp32 compute); its x PEFT is against "
            "peft_lora+nf4 (target for soft_moa: <= 1.15)")
    log(format_model_table(models))
    compiled = compile_benchmark(quick, device, rounds, memory=not quick)  # quick: no workers
    log("\ntraining step, eager and torch.compile(model, fullgraph=True) (inductor); "
        "compile s: the first compiled step; x PEFT: against PEFT LoRA run the same way "
        "(targets for soft_moa: compiled <= 1.15, speed-up > 1)")
    log(format_compiled_table(compiled))
    decode = decode_benchmark(quick, device, rounds)
    log("\ngreedy decoding with KV cache (batch 4, prompt 64, 32 new tokens); /compiled: "
        "static cache, decoding steps compiled (fullgraph); call: the whole generate call "
        "(targets for soft_moa: call x PEFT <= 1.2 eager, <= 1.1 compiled)")
    log(format_decode_table(decode))

    for name, rows in (("layers", layers), ("training_step", models),
                       ("training_step_compiled", compiled), ("decode", decode)):
        with open(out_dir / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    plots.plot_bars([r.variant for r in models], [r.ratio_to_peft for r in models],
                    out_dir / "training_step.png",
                    f"training step time / PEFT LoRA (lower is better; {device.type}"
                    f"{', quick' if quick else ''})", "ratio to PEFT LoRA")
    log(f"\nwrote {out_dir}/layers.csv, training_step.csv, training_step_compiled.csv, "
        "decode.csv, training_step.png")
    return {"layers": layers, "training_step": models, "training_step_compiled": compiled,
            "decode": decode}


def _memory_worker_main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="internal: peak memory of one variant")
    parser.add_argument("--memory-worker", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", default=None, metavar="BACKEND")
    args = parser.parse_args(argv)
    shape = MODEL_QUICK if args.quick else MODEL_FULL
    peak = measure_step_memory(args.memory_worker, shape, torch.device(args.device),
                               compiled=args.compile is not None,
                               backend=args.compile or "inductor")
    print(json.dumps({"peak_mb": peak}))


if __name__ == "__main__":
    _memory_worker_main()
