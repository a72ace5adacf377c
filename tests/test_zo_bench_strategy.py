"""Data-parallel ZO on 2 CPU processes (gloo): identical parameters on every rank, equal to one process."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_bpfree.zo import make_optimizer
from lightning_bpfree.zo.distributed import all_reduce_mean

NAMES = ("zo-sgd", "zo-adam", "forward-grad")


def problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=generator)
    y = x @ torch.randn(6, 1, generator=generator)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
    return model, x, y


def train(name, x, y, reducer=None, steps=4):
    model, _, _ = problem()
    # eps = 1e-2: the losses are float32, and a rounding of the loss (1e-7 relative) divided by
    # 2 eps must stay far below the tolerance of the comparison with one process
    opt = make_optimizer(name, model.parameters(), lr=0.02, eps=1e-2, seed=11)
    opt.loss_reducer = reducer
    for _ in range(steps):
        opt.step(lambda: ((model(x) - y) ** 2).mean())
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    _, x, y = problem()
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    for name in NAMES:
        flat = train(name, x[shard], y[shard], reducer=all_reduce_mean)
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            torch.save(gathered, os.path.join(out_dir, f"{name}.pt"))
    dist.destroy_process_group()


def test_two_processes_stay_bitwise_identical_and_match_one_process():
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(worker, args=(2, os.path.join(folder, "init"), folder), nprocs=2, start_method="fork")
        for name in NAMES:
            rank0, rank1 = torch.load(os.path.join(folder, f"{name}.pt"))
            assert torch.equal(rank0, rank1), name
            _, x, y = problem()
            single = train(name, x, y)
            # the mean of the two half-batch losses is the full-batch loss up to float rounding
            torch.testing.assert_close(rank0, single, rtol=1e-4, atol=1e-5)
            assert not torch.equal(single, train(name, x, y, steps=0))


def test_reducer_without_process_group_is_the_identity():
    values = torch.tensor([1.5, -2.0], dtype=torch.float64)
    assert torch.equal(all_reduce_mean(values), values)


@pytest.mark.slow
def test_lightning_trainer_with_the_strategy_on_two_processes():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "zo_bench_ddp.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    line = re.search(r"steps=(\d+) start_mse=([\d.]+) final_mse=([\d.]+) ranks_bitwise_identical=(\w+)", out.stdout)
    assert line, out.stderr[-2000:]
    steps, start, final, identical = line.groups()
    assert steps == "100" and identical == "True"
    assert float(final) < 0.8 * float(start)
