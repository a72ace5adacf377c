"""FP4 precision plugins under ``ModelParallelStrategy`` with FSDP2's ``fully_shard`` (2 CPU processes, gloo).

Lightning calls ``convert_module`` after ``configure_model``, i.e. after ``fully_shard``: the plugin
must make the sharded linears FP4 in place (the objects FSDP2 gathers weights into). Checked here:
the FP4 layers are there, each forward quantizes the whole gathered weight (it equals a standalone
``FP4Linear`` on the full weight), the first loss equals one process's FP4 loss on the combined
batch, and training lowers the loss.
"""

import os
import tempfile

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_bpfree import FP4Precision, NVFP4Precision
from lightning_bpfree.fp4 import FP4Linear
from lightning_bpfree.fp4.convert import convert_to_fp4
from lightning_bpfree.models import tiny_causal_lm

WORLD, PER_RANK, STEPS, VOCAB, SEQ = 2, 4, 12, 128, 32
PROBE = "model.layers.0.mlp.up_proj"  # a converted layer whose forward is checked (128 x 32)


def sequences():
    return torch.randint(3, VOCAB, (WORLD * PER_RANK, SEQ), generator=torch.Generator().manual_seed(0))


def language_model():
    return tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, seed=0)


class Task(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = language_model()
        self.losses, self.fp4_counts, self.probes = [], [], []

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def on_train_start(self):
        self.model.get_submodule(PROBE).register_forward_hook(self._probe)

    def _probe(self, module, args, output):
        """The layer's output against a standalone FP4Linear on the gathered weight and against plain F.linear."""
        if self.probes:
            return
        (x,) = args
        weight = module.weight.detach()
        with torch.no_grad():
            reference = FP4Linear(weight.shape[1], weight.shape[0], bias=False, recipe=module.recipe)
            reference.weight.copy_(weight)
            fp4 = reference(x.detach())
            high = nn.functional.linear(x.detach(), weight)
        self.probes.append(
            {
                "weight_shape": tuple(weight.shape),
                "weight_type": type(weight).__name__,
                "equals_fp4_on_full_weight": torch.equal(output.detach(), fp4),
                "relative_error_vs_high_precision": ((output.detach() - high).norm() / high.norm()).item(),
            }
        )

    def training_step(self, batch, batch_idx):
        self.fp4_counts.append(sum(isinstance(m, FP4Linear) for m in self.model.modules()))
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit(plugin, steps, world):
    task = Task()
    data = TensorDataset(sequences().repeat(steps, 1))  # every step sees the same 8 sequences
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        max_steps=steps, plugins=[plugin], use_distributed_sampler=False, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    sampler = DistributedSampler(data, shuffle=False)  # rank r: sequences r, r + 2, ...
    trainer.fit(task, DataLoader(data, batch_size=PER_RANK, sampler=sampler))
    losses = torch.stack(task.losses).double()
    dist.all_reduce(losses)  # the mean over ranks is the loss of the combined batch (equal token counts)
    return {
        "losses": (losses / world).tolist(),
        "fp4_counts": task.fp4_counts,
        "probe": task.probes[0],
        "kept": dict(plugin.report.kept),
        "converted": list(plugin.report.converted),
    }


def worker(rank, world, init_file, out_dir):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {"nvfp4": fit(NVFP4Precision(), STEPS, world), "mxfp4": fit(FP4Precision("mxfp4"), 2, world)}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp4fsdp")
    with tempfile.TemporaryDirectory() as init:
        mp.start_processes(
            worker, args=(WORLD, os.path.join(init, "init"), str(folder)), nprocs=WORLD, start_method="fork"
        )
    return torch.load(folder / "results.pt")


@pytest.mark.slow  # 2 processes, 14 training steps of a 2-layer LLaMA with emulated FP4: 15-40 s
def test_sharded_layers_are_fp4_and_quantize_the_whole_gathered_weight(results):
    for name, run in results.items():
        assert set(run["fp4_counts"]) == {14}, name  # q, k, v, o, gate, up, down in each of 2 blocks
        assert len(run["converted"]) == 14 and "model.lm_head" in run["kept"], name
        probe = run["probe"]
        # FSDP gathered the whole 128 x 32 weight into the layer, and the layer quantized it whole
        # (one tensor scale): a layer quantizing its 64-row shard, or not quantizing, would differ
        assert probe["weight_shape"] == (128, 32) and probe["weight_type"] != "DTensor", name
        assert probe["equals_fp4_on_full_weight"], name
        # measured: 0.14 (nvfp4) and 0.17 (mxfp4) relative error against the high-precision GEMM
        assert 0.02 < probe["relative_error_vs_high_precision"] < 0.3, (name, probe)


@pytest.mark.slow
def test_first_loss_equals_one_process_fp4_loss_and_training_lowers_it(results):
    losses = results["nvfp4"]["losses"]
    model = language_model()
    batch = sequences()
    with torch.no_grad():
        high = model(input_ids=batch, labels=batch).loss.item()
        convert_to_fp4(model)
        single = model(input_ids=batch, labels=batch).loss.item()
    print(f"first loss: sharded {losses[0]:.7f}, one process FP4 {single:.7f}, high precision {high:.7f}")
    print(f"losses over {STEPS} steps: {[round(v, 4) for v in losses]}")
    # measured (deterministic: nearest rounding in the forward): sharded and single agree to 7e-7, the
    # float32 rounding of two half-batch means vs one mean; FP4 moves the loss by 5.7e-4
    assert abs(losses[0] - single) < 3e-6
    assert abs(single - high) > 2e-4
    # measured: 4.84 -> 2.11 in 12 AdamW steps on the same 8 sequences
    assert losses[-1] < losses[0] - 1.0, losses
