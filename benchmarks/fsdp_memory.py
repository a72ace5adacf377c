"""Peak RSS per rank of ZerothOrder training under ModelParallelStrategy + fully_shard (1 vs N processes).

The measurement behind the memory table of docs/scaling.md (a 267 M-parameter LLaMA, fp32, 1 x 64 tokens per
rank-step, 2 steps; each configuration in its own processes, peak RSS from VmHWM):

    for world in 1 2; do
      MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python benchmarks/fsdp_memory.py --world $world --optimizer zo-sgd \
          --out bpfree-results/fsdp-memory/zo-sgd-w$world
    done

Each rank writes ``rank<r>.json`` (parameters, local parameters, baseline and peak RSS in bytes, seconds per step).
"""
import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def run(rank, world, init, out, args):
    if world > 1:
        os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0")
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from lightning_bpfree import ZerothOrder

    baseline = rss("VmRSS")
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         vocab_size=32000, max_position_embeddings=512)

    class Task(pl.LightningModule):
        def configure_model(self):
            with torch.device("meta"):
                self.model = LlamaForCausalLM(config)
            if self.device_mesh is not None:
                from torch.distributed.fsdp import fully_shard
                mesh = self.device_mesh["data_parallel"]
                fully_shard(self.model.model.embed_tokens, mesh=mesh)
                for layer in self.model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(self.model.lm_head, mesh=mesh)
                fully_shard(self.model, mesh=mesh)
            self.model.to_empty(device="cpu")
            generator = torch.Generator().manual_seed(rank)
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    local = p.to_local() if hasattr(p, "to_local") else p
                    local.fill_(1.0) if "norm" in name else local.normal_(0.0, 0.02, generator=generator)
            self.model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
            self.model.eval()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    steps = args.steps
    data = TensorDataset(torch.randint(3, 32000, (steps * 2, args.seq), generator=torch.Generator().manual_seed(0)))
    if world > 1:
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
        loader = DataLoader(data, batch_size=2 // world, sampler=DistributedSampler(data, shuffle=False))
    else:
        strategy, loader = "auto", DataLoader(data, batch_size=2)
    options = dict(lr=1e-6, eps=1e-3, seed=0)
    task = Task()
    timings = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            timings.append(time.perf_counter() - self.t)

    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps,
                         callbacks=[ZerothOrder(args.optimizer, **options), Timer()], use_distributed_sampler=False,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, loader)
    params = sum(p.numel() for p in task.model.parameters())
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in task.model.parameters())
    result = dict(rank=rank, world=world, optimizer=args.optimizer, params=params, local_params=local,
                  baseline=baseline, peak=rss("VmHWM"), seconds_per_step=timings[1:] or timings)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--optimizer", default="zo-sgd")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.world == 1:
        run(0, 1, None, args.out, args)
    else:
        with tempfile.TemporaryDirectory() as d:
            mp.start_processes(run, args=(args.world, os.path.join(d, "init"), args.out, args), nprocs=args.world,
                               start_method="fork")
    for rank in range(args.world):
        print(open(os.path.join(args.out, f"rank{rank}.json")).read())
