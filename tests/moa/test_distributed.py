"""Data-parallel training through torch.distributed: two gloo processes on CPU, each with half
of a batch, give what one process computes on the whole batch, and save_pretrained, called on
every rank, writes what one process would save.

Scenarios (one pair of worker processes runs them all, in order, since starting a pair costs
more than every scenario together):
- ddp: one backward under DistributedDataParallel; the gradients.
- ddp_sparse, ddp_sparse_learned: sparse_moa under DDP with find_unused_parameters=False
  (the default), several AdamW steps; the published frozen thresholds (with reentrant
  activation checkpointing), then RouterConfig(learn_threshold=True); every step's
  gradients, and the saved adapter.
- fsdp2: from_pretrained, then fully_shard per decoder layer and on the MoAModel (DTensor
  parameters), AdamW steps, save_pretrained on every rank.
- fsdp1: FullyShardedDataParallel with one unit per decoder layer (use_orig_params=True:
  `_fsdp_wrapped_module.` in every module path), AdamW steps, save_pretrained on every rank
  (before the first forward, which sets the units up, it is refused and breaks nothing).
- fsdp1_root: one FullyShardedDataParallel unit around the MoAModel: its MoA tensors are
  slices that the model cannot gather from inside; save_pretrained says so and writes
  nothing, and with FSDP's full state dict passed as state_dict= it saves.
- zero3: DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu, every parameter partitioned), AdamW steps,
  save_pretrained on every rank; skipped where deepspeed is not installed.
The parent reloads each saved adapter into a fresh model and compares its logits with a
one-process run on the combined batch.

The run is bounded in time whatever the machine does: the workers talk over the loopback
interface (not whatever the host name resolves to), each worker dumps its stack and exits if it
outlives its deadline, and the parent kills both at the deadline. If the two processes cannot
even exchange one tensor, the machine cannot run gloo and the tests skip with that reason; a
hang between that point and the written results is a failure of ours. A scenario that raises
records its traceback and the workers go on to the next one.
"""

import datetime
import faulthandler
import importlib.util
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from moa import MoAConfig, MoAModel, get_moa_model
from tests.conftest import relative_error
from tests.gloo import WORLD_SIZE, launch, leave, mark, run_scenarios, scenario_folder
from tests.moa.tiny import perturb, tiny_llama, token_batch

BATCH = token_batch(4, 10, seed=11)  # rows 0-1 on rank 0, rows 2-3 on rank 1
STEPS = 3
LR = 1e-2
DEADLINE_S = 240
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
SCENARIOS = ["ddp", "ddp_sparse", "ddp_sparse_learned", "fsdp2", "fsdp1", "fsdp1_root"] + \
    (["zero3"] if HAS_DEEPSPEED else [])


def sparse_config(learn_threshold: bool = False) -> MoAConfig:
    config = MoAConfig.preset("sparse_moa")
    return replace(config, router=replace(config.router, learn_threshold=learn_threshold))


def build_model(config: MoAConfig | None = None) -> MoAModel:
    moa = get_moa_model(tiny_llama(), MoAConfig() if config is None else config)
    perturb(moa)
    return moa.train()


def gradients(moa) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in moa.moa_named_parameters()
            if param.grad is not None}


def optimizer_for(module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR)


def train_one_process(moa, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    """What each scenario does on two ranks, on the combined batch: every step's gradients."""
    optimizer, steps_grads = optimizer_for(moa), []
    for _ in range(steps):
        optimizer.zero_grad()
        moa(input_ids=BATCH, labels=BATCH).loss.backward()
        steps_grads.append(gradients(moa))
        optimizer.step()
    return steps_grads


def logits_of(moa) -> torch.Tensor:
    with torch.no_grad():
        return moa.eval()(input_ids=BATCH).logits


# ---------------------------------------------------------------------------------------
# the scenarios, as each rank runs them
# ---------------------------------------------------------------------------------------

def run_ddp(rank: int, out: str) -> None:
    model = DistributedDataParallel(build_model())
    ids = BATCH.chunk(WORLD_SIZE)[rank]
    model(input_ids=ids, labels=ids).loss.backward()
    save_file(gradients(model.module), os.path.join(out, f"rank{rank}.safetensors"))


def run_ddp_sparse(rank: int, out: str, learn_threshold: bool = False) -> None:
    moa = build_model(sparse_config(learn_threshold))
    if not learn_threshold:  # with reentrant activation checkpointing as well
        moa.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": True})
        assert all(layer.gradient_checkpointing for layer in moa.model.model.layers)
    model = DistributedDataParallel(moa)  # find_unused_parameters=False, the default
    optimizer, ids = optimizer_for(model), BATCH.chunk(WORLD_SIZE)[rank]
    for step in range(STEPS):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        save_file(gradients(moa), os.path.join(out, f"rank{rank}.step{step}.safetensors"))
        optimizer.step()
    moa.save_pretrained(os.path.join(out, "adapter"))  # on every rank; rank 0 writes


def train_sharded(model, rank: int, step=None) -> None:
    optimizer, ids = optimizer_for(model), BATCH.chunk(WORLD_SIZE)[rank]
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        if step is None:
            loss.backward()
            optimizer.step()
        else:
            step(loss)


def run_fsdp2(rank: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Loaded first, sharded afterwards: from_pretrained into a model FSDP then shards.
    moa = MoAModel.from_pretrained(tiny_llama(), os.path.join(out, "..", "initial"),
                                   is_trainable=True).train()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in moa.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(moa, mesh=mesh)
    assert type(next(moa.moa_named_parameters())[1]).__name__ == "DTensor"
    train_sharded(moa, rank)
    moa.save_pretrained(os.path.join(out, "adapter"))


def run_fsdp1(rank: int, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    moa = build_model()
    model = FullyShardedDataParallel(moa, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                     use_orig_params=True, device_id=torch.device("cpu"))
    try:  # before the first forward: refused, and the training below still works
        moa.save_pretrained(os.path.join(out, "too-early"))
    except RuntimeError as error:
        with open(os.path.join(out, f"rank{rank}.refusal"), "w") as handle:
            handle.write(str(error))
    train_sharded(model, rank)
    assert any("_fsdp_wrapped_module" in name for name, _ in moa.named_parameters())
    moa.save_pretrained(os.path.join(out, "adapter"))


def run_fsdp1_root(rank: int, out: str) -> None:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    moa = build_model()
    model = FSDP(moa, use_orig_params=True, device_id=torch.device("cpu"))
    train_sharded(model, rank)
    try:
        moa.save_pretrained(os.path.join(out, "refused"))
    except RuntimeError as error:
        with open(os.path.join(out, f"rank{rank}.refusal"), "w") as handle:
            handle.write(str(error))
    # (offload_to_cpu=True: a segfault in FSDP1's state-dict hook with CPU tensors, torch 2.13)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
        state = model.state_dict()  # the whole model on rank 0, empty elsewhere
    moa.save_pretrained(os.path.join(out, "adapter"), state_dict=state)


def run_zero3(rank: int, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    import deepspeed

    # DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce for CPU
    # inference on first use (minutes with a C++ toolchain, an error without one); training
    # never calls it, so it is left out.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    moa = build_model()
    config = {"train_micro_batch_size_per_gpu": BATCH.shape[0] // WORLD_SIZE,
              "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
              # every parameter partitioned, however small (the default keeps small ones whole)
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=moa, optimizer=optimizer_for(moa), config=config)
    assert all(param.numel() == 0 for _, param in moa.moa_named_parameters())

    def step(loss):
        engine.backward(loss)
        engine.step()

    train_sharded(engine, rank, step)
    moa.save_pretrained(os.path.join(out, "adapter"))


RUNS = {"ddp": run_ddp, "ddp_sparse": run_ddp_sparse,
        "ddp_sparse_learned": lambda rank, out: run_ddp_sparse(rank, out, learn_threshold=True),
        "fsdp2": run_fsdp2, "fsdp1": run_fsdp1, "fsdp1_root": run_fsdp1_root,
        "zero3": run_zero3}


def worker(rank: int, port: int, out_dir: str) -> None:
    # Well before the parent's deadline, which also counts this process's start-up.
    faulthandler.dump_traceback_later(DEADLINE_S - 40, exit=True)
    mark(out_dir, rank, "started")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        dist.all_reduce(torch.ones(1))
        mark(out_dir, rank, "connected")
        run_scenarios(rank, out_dir, SCENARIOS, RUNS)
    finally:
        dist.destroy_process_group()
    leave()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The directory of every scenario's results, from one run of the two workers."""
    out_dir = tmp_path_factory.mktemp("gloo")
    build_model().save_pretrained(out_dir / "initial")  # what fsdp2 loads, then shards
    return out_dir, launch(worker, out_dir, DEADLINE_S)


def results(runs, scenario: str) -> Path:
    return scenario_folder(runs, scenario)


def assert_adapter_reproduces(directory, expected: MoAModel) -> None:
    """The adapter in `directory`, loaded into a fresh model in this process, gives the
    logits of `expected` (trained in one process), which the training moved well away from
    where it started: the comparison is not of two nearly untrained models."""
    reloaded = MoAModel.from_pretrained(tiny_llama(), directory)
    assert set(load_file(directory / "adapter_model.safetensors")) == \
        {name for name, _ in expected.moa_named_parameters()}  # no wrapper prefixes
    expected_logits = logits_of(expected)
    start = logits_of(MoAModel.from_pretrained(tiny_llama(), directory.parent.parent / "initial"))
    assert relative_error(start, expected_logits) > 1e-3  # the steps changed the outputs
    assert relative_error(logits_of(reloaded), expected_logits) < 1e-4


def test_two_gloo_processes_match_one_process_on_the_combined_batch(runs):
    out = results(runs, "ddp")
    single = build_model()
    single(input_ids=BATCH, labels=BATCH).loss.backward()
    expected = gradients(single)
    for rank in range(WORLD_SIZE):
        grads = load_file(out / f"rank{rank}.safetensors")
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            assert relative_error(grads[name], grad) < 1e-5, (rank, name)


@pytest.mark.parametrize("learn_threshold", [False, True], ids=["frozen", "learned"])
def test_sparse_moa_under_ddp_without_unused_parameters_matches_one_process(runs,
                                                                            learn_threshold):
    out = results(runs, "ddp_sparse_learned" if learn_threshold else "ddp_sparse")
    single = build_model(sparse_config(learn_threshold))
    expected = train_one_process(single)
    thresholds = [name for name, _ in single.moa_named_parameters() if ".threshold_" in name]
    assert thresholds
    for step, step_grads in enumerate(expected):
        # frozen: no gradient, exactly as published; learned: one every step
        assert all((name in step_grads) == learn_threshold for name in thresholds), step
        for rank in range(WORLD_SIZE):
            grads = load_file(out / f"rank{rank}.step{step}.safetensors")
            assert grads.keys() == step_grads.keys(), (rank, step)
            for name, grad in step_grads.items():
                assert relative_error(grads[name], grad) < 1e-5, (rank, step, name)
    assert_adapter_reproduces(out / "adapter", single)


@pytest.fixture(scope="module")
def trained_in_one_process() -> MoAModel:
    """What every sharded scenario trains, in one process on the combined batch."""
    single = build_model()
    train_one_process(single)
    return single


@pytest.mark.parametrize("scenario", ["fsdp2", "fsdp1", "fsdp1_root", "zero3"])
def test_sharded_training_saves_on_every_rank_what_one_process_saves(runs, scenario,
                                                                     trained_in_one_process):
    if scenario == "zero3" and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (scripts/setup.sh installs it with the test "
                    "extra)")
    out = results(runs, scenario)
    single = trained_in_one_process
    assert_adapter_reproduces(out / "adapter", single)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    for name, param in single.moa_named_parameters():
        assert relative_error(saved[name], param.detach()) < 1e-4, name


def test_an_fsdp1_unit_around_the_moa_model_is_refused_with_the_way_out(runs):
    out = results(runs, "fsdp1_root")
    assert not (out / "refused").exists()
    for rank in range(WORLD_SIZE):
        message = (out / f"rank{rank}.refusal").read_text()
        assert "cannot read the MoA tensors whole" in message
        assert "auto_wrap_policy" in message and "state_dict=" in message


def test_saving_an_fsdp1_model_before_its_first_forward_is_refused(runs):
    out = results(runs, "fsdp1")
    assert not (out / "too-early").exists()
    for rank in range(WORLD_SIZE):
        assert "first forward" in (out / f"rank{rank}.refusal").read_text()
