"""Data-parallel training through torch.distributed: two gloo processes on CPU, each with half
of a batch, give the gradients one process computes on the whole batch."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from moa import MoAConfig, get_moa_model
from tests.conftest import relative_error
from tests.moa.tiny import perturb, tiny_llama, token_batch

WORLD_SIZE = 2
BATCH = token_batch(4, 10, seed=11)  # rows 0-1 on rank 0, rows 2-3 on rank 1


def build_model():
    moa = get_moa_model(tiny_llama(), MoAConfig())
    perturb(moa)
    return moa.train()


def gradients(moa) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in moa.moa_named_parameters()}


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A timeout, so that a rank that fails cannot leave the other waiting forever.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        model = DistributedDataParallel(build_model())
        ids = BATCH.chunk(WORLD_SIZE)[rank]
        model(input_ids=ids, labels=ids).loss.backward()
        save_file(gradients(model.module), os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_gloo_processes_match_one_process_on_the_combined_batch(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    single = build_model()
    single(input_ids=BATCH, labels=BATCH).loss.backward()
    expected = gradients(single)
    for rank in range(WORLD_SIZE):
        grads = load_file(tmp_path / f"rank{rank}.safetensors")
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            assert relative_error(grads[name], grad) < 1e-5, (rank, name)
