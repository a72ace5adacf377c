"""``ZerothOrder`` under Lightning's own ``strategy="ddp"`` on 2 CPU processes (gloo).

The processes are started here (``LOCAL_RANK`` set, the process group initialised from a file), so
Lightning's DDPStrategy uses them instead of relaunching the test command.
"""

import os
import tempfile

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_zo_callback import Regressor, regression_data
from torch.utils.data import DataLoader

from lightning_bpfree import ZerothOrder
from lightning_bpfree.zo import FirstOrderPart, ZODataParallelStrategy

STEPS = 5


def fit(strategy, rank, hybrid=False):
    """Parameters after STEPS steps; the module is built from a seed that differs per rank (DDP syncs it)."""
    torch.manual_seed(100 + rank)  # different initial weights and default ZO seeds on each rank
    module = Regressor()
    options = {"first_order": FirstOrderPart(module.net[3].parameters(), lr=1e-2)} if hybrid else {}
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS,
        callbacks=[ZerothOrder("zo-adam", lr=0.02, eps=1e-2, **options)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(regression_data(), batch_size=32, shuffle=False))
    assert trainer.global_step == STEPS
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return gathered


def worker(rank, world, init_file, out_dir):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {
        "ddp": fit("ddp", rank),
        "zo-strategy": fit(ZODataParallelStrategy(process_group_backend="gloo"), rank),
        "ddp-hybrid": fit("ddp", rank, hybrid=True),
        "zo-strategy-hybrid": fit(ZODataParallelStrategy(process_group_backend="gloo"), rank, hybrid=True),
    }
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


def test_lightning_ddp_keeps_ranks_bitwise_identical_and_equals_the_zo_strategy():
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(worker, args=(2, os.path.join(folder, "init"), folder), nprocs=2, start_method="fork")
        results = torch.load(os.path.join(folder, "results.pt"))
    for name, (rank0, rank1) in results.items():
        assert torch.equal(rank0, rank1), name  # without the shared seed and averaged losses they drift
    assert torch.equal(results["ddp"][0], results["zo-strategy"][0])
    assert torch.equal(results["ddp-hybrid"][0], results["zo-strategy-hybrid"][0])
