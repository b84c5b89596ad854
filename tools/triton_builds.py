"""sm_90 builds of the kernels made the way a GPU run makes them, without a GPU.

A launch `kernel[grid](*args)` on a GPU compiles the kernel for its *specialisation*: the
JIT (triton.runtime.jit) turns every integer argument equal to 1 into a constant and marks
every pointer whose address, and every integer whose value, is divisible by 16
(`tt.divisibility = 16`, what lets loads be vectorised and pipelined). A build that leaves
that out is another binary: the issue-13 review found `_matmul_kernel` bf16 at 255
registers with spills in such a build, 70-100 without spills in the real one.

`record(run)` calls `run()` with every kernel launch intercepted: triton's own binder for
an sm_90 CUDA backend binds and specialises the arguments, and nothing is launched.
Tensors may live on the meta device (their address is 0 plus the view's offset: as aligned
as a CUDA allocation, and a view keeps its real misalignment), so the realistic shapes cost
no memory; the custom ops get meta kernels that run their launchers (their fake
implementations would skip the launches). `build(launch)` compiles one launch with
triton.compile for GPUTarget("cuda", 90, 32), exactly as the JIT's `_do_compile` does,
runs the ptxas it ships with the JIT's flags for the register report, and reads the PTX.

Run this in a process of its own with TRITON_INTERPRET unset (the kernels must be JIT
functions, and the meta kernels stay registered in that process). It uses triton's JIT
internals (`create_function_from_signature`, `JITFunction._pack_args`) as of 3.9: it is a
CI check, not runtime code.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

# H100 / H200 (sm_90) per-SM limits, for the occupancy estimate (CUDA occupancy rules:
# registers are allocated per warp in units of 256, shared memory per CTA plus 1 KiB
# reserved by the system)
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_CTA = 1024
WARPS_PER_SM = 64
CTAS_PER_SM = 32
# The issue-13 budget: registers per thread by warps per program (4 warps at 168: three
# CTAs, 12 warps, per SM)
REGISTER_BUDGET = {4: 168}


@dataclass
class Launch:
    """One intercepted launch, specialised as the JIT specialises it."""

    name: str
    kernel: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # CUDAOptions
    grid: tuple
    key: str = ""  # what makes two launches the same build

    @property
    def constants(self) -> dict:
        """The constexpr parameters by name (the JIT's ints equal to 1 included)."""
        names = self.kernel.arg_names
        return {names[path[0]]: value for path, value in self.constexprs.items()}

    @property
    def aligned(self) -> list[str]:
        """The parameters marked divisible by 16."""
        names = self.kernel.arg_names
        return [names[path[0]] for path, attr in self.attrs.items() if attr]


@dataclass
class Build:
    """What ptxas and the PTX say about one build."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int  # bytes of (dynamic) shared memory per CTA
    num_warps: int
    num_stages: int
    wgmma: int  # wgmma.mma_async instructions in the PTX (Hopper tensor cores)
    mma: int  # mma.sync instructions (Ampere-style tensor cores)
    dots: dict = field(default_factory=dict)  # tt.dot operand dtype -> count in the TTIR
    loads: dict = field(default_factory=dict)  # global load kind -> count in the PTX

    @property
    def ctas_per_sm(self) -> int:
        """Resident CTAs per SM (the occupancy calculator's rule)."""
        per_warp = -(-max(self.registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
        by_registers = REGISTERS_PER_SM // (per_warp * self.num_warps)
        by_shared = SHARED_PER_SM // (self.shared + SHARED_RESERVED_PER_CTA)
        return min(by_registers, by_shared, WARPS_PER_SM // self.num_warps, CTAS_PER_SM)

    @property
    def tensor_cores(self) -> str:
        return "wgmma" if self.wgmma else "mma" if self.mma else "none"

    @property
    def half_dots(self) -> int:
        """tl.dot ops with fp16 / bf16 operands (those must run on tensor cores)."""
        return self.dots.get("bf16", 0) + self.dots.get("f16", 0)

    def violations(self) -> list[str]:
        """Where this build breaks the issue-13 budget: no spills; at most 168 registers
        per thread for 4-warp programs (3 CTAs per SM), 255 otherwise; fp16 / bf16 dots
        on tensor cores."""
        found = []
        if self.spills or self.stack:
            found.append(f"spills {self.spill_stores} B stored / {self.spill_loads} B "
                         f"loaded, stack {self.stack} B")
        limit = REGISTER_BUDGET.get(self.num_warps, 255)
        if self.registers > limit:
            found.append(f"{self.registers} registers > {limit} at {self.num_warps} warps")
        if self.half_dots and not (self.wgmma or self.mma):
            found.append(f"{self.half_dots} fp16/bf16 dots not on tensor cores")
        return found

    def row(self) -> dict:
        """A flat record (JSON, tables)."""
        return {"kernel": self.name, "warps": self.num_warps, "stages": self.num_stages,
                "registers": self.registers, "spill_stores": self.spill_stores,
                "spill_loads": self.spill_loads, "stack": self.stack, "shared": self.shared,
                "ctas_per_sm": self.ctas_per_sm, "tensor_cores": self.tensor_cores,
                "wgmma": self.wgmma, "mma": self.mma, "dots": self.dots,
                "loads": self.loads, "violations": self.violations()}

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


# ---------------------------------------------------------------------------------------
# recording
# ---------------------------------------------------------------------------------------

def _target_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    return target, make_backend(target)


_META_KERNELS = False


def _register_meta_kernels() -> None:
    """Give every moa custom op a meta kernel that runs its launcher."""
    global _META_KERNELS
    if _META_KERNELS:
        return
    from moa_kernels.triton import ops

    for name in dir(ops):
        op = getattr(ops, name)
        if isinstance(op, torch._library.custom_ops.CustomOpDef):
            op.register_kernel("meta")(op._init_fn)
    _META_KERNELS = True


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, kernel launches are specialised and recorded, not run."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import moa_kernels.triton as package

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("builds.recording needs compiled kernels: unset TRITON_INTERPRET")
    _register_meta_kernels()
    target, backend = _target_backend()
    launches: list[Launch] = []
    binders: dict[int, Callable] = {}
    original_run = JITFunction.run
    original_check = package.check_triton_input

    def run(self, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", False)
        if id(self) not in binders:
            binders[id(self)] = create_function_from_signature(self.signature, self.params,
                                                               backend)
        bound, specialization, options = binders[id(self)](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound,
                                                                specialization, options)
        grid = grid(bound) if callable(grid) else tuple(grid)
        key = repr((self.fn.__module__, self.fn.__name__, sorted(signature.items()),
                    sorted((k, repr(v)) for k, v in constexprs.items()),
                    sorted((k, repr(v)) for k, v in attrs.items()), repr(options)))
        launches.append(Launch(self.fn.__name__, self, signature, constexprs, attrs, options,
                               grid, key))

    JITFunction.run = run
    package.check_triton_input = lambda x: None  # meta tensors are welcome here
    try:
        yield launches
    finally:
        JITFunction.run = original_run
        package.check_triton_input = original_check
        del target


def unique(launches: list[Launch]) -> list[Launch]:
    """One launch per distinct build, in first-seen order."""
    seen: dict[str, Launch] = {}
    for launch in launches:
        seen.setdefault(launch.key, launch)
    return list(seen.values())


# ---------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                           r"(\d+) bytes spill loads")
_LD_GLOBAL = re.compile(r"\bld\.global(\S*)\s")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s*\[[^\]]*\],\s*\[[^\]]*\],"
                       r"\s*(0x[0-9a-fA-F]+|\d+)")


def global_loads(ptx: str) -> dict[str, int]:
    """Global loads in the PTX by kind and bytes per thread: "ld 16B" (ld.global.v4.b32,
    a vectorised load), "ld 2B" (a scalar bf16 load), ..., "cp.async 16B" (an asynchronous,
    pipelined copy to shared memory), "tma" (bulk tensor copies)."""
    counts: dict[str, int] = {}
    for modifiers in _LD_GLOBAL.findall(ptx):
        parts = modifiers.split(".")
        vector = 4 if "v4" in parts else 2 if "v2" in parts else 1
        width = next((int(p[1:]) for p in reversed(parts)
                      if re.fullmatch(r"[bsuf]\d+", p)), 32)
        kind = f"ld {vector * width // 8}B"
        counts[kind] = counts.get(kind, 0) + 1
    for size in _CP_ASYNC.findall(ptx):
        kind = f"cp.async {int(size, 0)}B"
        counts[kind] = counts.get(kind, 0) + 1
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
    if tma:
        counts["tma"] = tma
    return dict(sorted(counts.items()))


def dot_operands(ttir: str) -> dict[str, int]:
    """tt.dot ops in the TTIR by the element type of their first operand."""
    counts: dict[str, int] = {}
    for element in re.findall(r"\btt\.dot\b[^:]*:\s*tensor<[0-9x]*x(\w+)", ttir):
        counts[element] = counts.get(element, 0) + 1
    return counts


def build(launch: Launch) -> Build:
    """Compile one launch for sm_90 as the JIT would, and report on the binary."""
    import triton
    from triton.compiler import ASTSource

    target, _ = _target_backend()
    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(source, target=target, options=launch.options.__dict__)
    ptx = compiled.asm["ptx"]
    registers, stores, loads_spilled, stack = _ptxas_report(ptx)
    metadata = compiled.metadata
    return Build(
        launch.name, registers, stores, loads_spilled, stack, int(metadata.shared),
        int(metadata.num_warps), int(metadata.num_stages),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma=len(re.findall(r"\bmma\.sync", ptx)),
        dots=dot_operands(compiled.asm["ttir"]), loads=global_loads(ptx))


def _ptxas_report(ptx: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack bytes) from `ptxas -v`, run
    with the flags triton's make_cubin uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", source,
             "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    registers = _PTXAS_REGISTERS.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas report: {log[-500:]}")
    stack, stores, loads = (int(v) for v in spills.groups())
    return int(registers.group(1)), stores, loads, stack


# ---------------------------------------------------------------------------------------
# the layers a GPU run builds for
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerConfig:
    """A MoALinear shape: T tokens, in -> out, its experts, its router (None: gates come
    from a layer router outside, as in the paper layout)."""

    name: str
    tokens: int
    in_features: int
    out_features: int
    experts: tuple[str, ...]
    router: object = None  # a RouterConfig, or None
    sparse_plan: str = "masked"  # MOA_TRITON_SPARSE for the sparse modes
    pairs_per_token: int = 0  # grouped plan on meta tensors: the active pairs per token

    def run(self, dtype: torch.dtype, device: str = "meta") -> None:
        """One forward and backward of the triton backend on this shape (x requires grad,
        the base frozen), on `device` (meta: nothing is allocated). The grouped plan's pair
        plan depends on the data; on meta tensors it is replaced by one of
        `pairs_per_token` pairs per token (the sizes the launches see)."""
        with _sparse_plan(self, device):
            self._run(dtype, device)

    def _run(self, dtype: torch.dtype, device: str) -> None:
        from torch import nn

        import moa_kernels.triton as package
        from moa import MoALinear

        base = nn.Linear(self.in_features, self.out_features, device=device, dtype=dtype)
        layer = MoALinear(base, list(self.experts), self.router, backend="triton",
                          adapter_dtype="base")
        x = torch.empty(self.tokens, self.in_features, device=device, dtype=dtype,
                        requires_grad=True)
        gates = None
        if self.router is None:
            gates = torch.empty(self.tokens, layer.num_experts, device=device, dtype=dtype,
                                requires_grad=True)
        shrink_w, shrink_b, expand_w, expand_b = layer._stacked(dtype)
        y, _ = package.moa_linear(
            x, base_weight=layer.base.weight, base_bias=layer.base.bias, layout=layer.layout,
            shrink_weight=shrink_w, shrink_bias=shrink_b, expand_weight=expand_w,
            expand_bias=expand_b, router=None if gates is not None else layer.router.ops(dtype),
            gates=gates, sparse=self.router is not None and self.router.is_sparse)
        y.backward(torch.empty_like(y))


@contextlib.contextmanager
def _sparse_plan(config: LayerConfig, device: str) -> Iterator[None]:
    """MOA_TRITON_SPARSE = config.sparse_plan within the block; on the meta device the
    grouped plan's PairPlan.of gives meta tensors of config.pairs_per_token pairs a token."""
    from moa_kernels.triton import grouped

    variable = grouped.SPARSE_PLAN_VARIABLE
    saved_value, saved_of = os.environ.get(variable), grouped.PairPlan.__dict__["of"]
    os.environ[variable] = config.sparse_plan

    def meta_plan(cls, active):
        tokens, experts = active.shape
        k = min(config.pairs_per_token, experts)
        index = dict(device=active.device, dtype=torch.int64)
        return cls(torch.empty(tokens * k, **index), torch.empty(tokens * k, **index),
                   torch.empty(experts + 1, **index), torch.empty(tokens, k, **index))

    if device == "meta" and config.sparse_plan == "grouped":
        grouped.PairPlan.of = classmethod(meta_plan)
    try:
        yield
    finally:
        grouped.PairPlan.of = saved_of
        if saved_value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved_value


def layer_configs() -> list[LayerConfig]:
    """L1, M8 soft and top-2 (the bench's layer cases at T = 2048, 2048 x 2048) and a
    Llama-3.1-8B decoder layer at T = 8192: LoRA r=8 on q, k, v, o (hidden 4096, 8 KV heads
    of 128) and down (intermediate 14336), gated by one layer router outside."""
    from moa.cli.bench import LAYER_CASES
    from moa.config import RouterConfig

    configs = [LayerConfig(case.name, 2048, 2048, 2048, tuple(case.experts), case.router)
               for case in LAYER_CASES]
    # the grouped sparse plan (MOA_TRITON_SPARSE=grouped) on M8 top-2 and L1's experts
    # under a top-2 router, as the GPU suite measures them
    cases = {case.name: case for case in LAYER_CASES}
    configs += [
        LayerConfig("M8 topk2 grouped", 2048, 2048, 2048, tuple(cases["M8 topk2"].experts),
                    cases["M8 topk2"].router, "grouped", 2),
        LayerConfig("L1 topk2 grouped", 2048, 2048, 2048, tuple(cases["L1 soft"].experts),
                    RouterConfig(mode="topk", top_k=2), "grouped", 2)]
    for module, (d_in, d_out) in {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024),
                                  "o": (4096, 4096), "down": (14336, 4096)}.items():
        configs.append(LayerConfig(f"8B {module}", 8192, d_in, d_out, ("lora:8",)))
    return configs


def tiny_configs() -> list[LayerConfig]:
    """Small odd shapes (no 16-divisible sizes: the other specialisation) over every mode,
    every activation, hydra heads and outside gates: what the compile test builds besides
    the realistic shapes."""
    from moa.config import RouterConfig

    mixed = ("adapter:5:silu", "lora:8", "hydra:4:2")
    every_activation = ("adapter:6:silu", "lora:1", "adapter:3:gelu", "lora:33",
                        "adapter:9:relu", "lora:5", "adapter:2:identity")
    return [LayerConfig("tiny soft", 7, 24, 20, mixed, RouterConfig()),
            LayerConfig("tiny topk", 7, 24, 20, mixed, RouterConfig(mode="topk")),
            LayerConfig("tiny threshold", 9, 19, 23, every_activation,
                        RouterConfig(mode="threshold")),
            LayerConfig("tiny adaptive", 1, 19, 23, every_activation,
                        RouterConfig(gate="softmax", mode="adaptive")),
            LayerConfig("tiny gates", 5, 13, 11, ("lora:4", "adapter:3:gelu")),
            LayerConfig("tiny topk grouped", 7, 24, 20, mixed, RouterConfig(mode="topk"),
                        "grouped", 2),
            LayerConfig("tiny threshold grouped", 9, 19, 23, every_activation + ("lora:70",),
                        RouterConfig(mode="threshold"), "grouped", 3),
            LayerConfig("tiny adaptive grouped", 1, 19, 23, every_activation,
                        RouterConfig(gate="softmax", mode="adaptive"), "grouped", 1)]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


_PENDING: list[Launch] = []  # the launches a forked build worker compiles (by index)


def _build_row(index: int) -> dict:
    return build(_PENDING[index]).row()


def measure(configs: list[LayerConfig], dtypes: list[str], jobs: int = 1) -> list[dict]:
    """Every distinct build that one forward + backward of each config makes in each dtype,
    compiled and reported once (with every config that makes it); `jobs` builds at a time
    (forked processes: the builds are independent)."""
    rows: dict[str, dict] = {}
    launches: list[Launch] = []
    for dtype in dtypes:
        for config in configs:
            with recording() as recorded:
                config.run(DTYPES[dtype])
            for launch in unique(recorded):
                if launch.key not in rows:
                    rows[launch.key] = {"dtype": dtype, "configs": [],
                                        "constants": {k: repr(v) for k, v in
                                                      launch.constants.items()},
                                        "aligned": launch.aligned}
                    launches.append(launch)
                if config.name not in rows[launch.key]["configs"]:
                    rows[launch.key]["configs"].append(config.name)
    _PENDING[:] = launches
    if jobs > 1 and len(launches) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            reports = pool.map(_build_row, range(len(launches)))
    else:
        reports = [_build_row(i) for i in range(len(launches))]
    for launch, report in zip(launches, reports):
        rows[launch.key].update(report)
    return list(rows.values())


def markdown(rows: list[dict]) -> str:
    """The RESULTS.md table of `measure`'s rows."""
    lines = ["| configs | dtype | kernel | warps | registers | spills (B) | shared (B) | "
             "CTAs/SM | tensor cores | dots | 16-byte loads | narrower loads |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for row in rows:
        loads = row["loads"]
        wide = sum(n for kind, n in loads.items() if kind in ("ld 16B", "cp.async 16B", "tma"))
        narrow = sum(n for kind, n in loads.items()
                     if kind not in ("ld 16B", "cp.async 16B", "tma"))
        dots = ", ".join(f"{n} {kind}" for kind, n in row["dots"].items()) or "-"
        lines.append(
            f"| {', '.join(row['configs'])} | {row['dtype']} | `{row['kernel']}` | "
            f"{row['warps']} | {row['registers']} | "
            f"{row['spill_stores'] + row['spill_loads']} | {row['shared']} | "
            f"{row['ctas_per_sm']} | {row['tensor_cores']} | {dots} | {wide} | {narrow} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(
        description="Build every kernel launch of the given layer shapes for sm_90 as a GPU "
                    "run specialises it (no GPU needed) and report registers, spills, "
                    "shared memory, occupancy, tensor cores and load widths.")
    parser.add_argument("--set", choices=["realistic", "tiny", "all"], default="realistic")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--markdown", action="store_true", help="print the table")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a build breaks the budget (see Build.violations)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="builds compiled at a time")
    args = parser.parse_args(argv)
    configs = {"realistic": layer_configs(), "tiny": tiny_configs(),
               "all": layer_configs() + tiny_configs()}[args.set]
    rows = measure(configs, args.dtypes.split(","), args.jobs)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    if args.markdown:
        print(markdown(rows))
    broken = [f"{r['kernel']} {r['dtype']} ({', '.join(r['configs'])}): {v}"
              for r in rows for v in r["violations"]]
    for line in broken:
        print(f"over budget: {line}", file=sys.stderr)
    return 1 if args.check and broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
