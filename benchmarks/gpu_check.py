"""One prepared script for a lent CUDA GPU (not part of the test suite; CI has no GPU).

    PYTHONPATH=. python3 benchmarks/gpu_check.py OUT_DIR

1. ``bpfree zo-bench --part memory`` on CUDA: peak ``torch.cuda.max_memory_allocated`` and seconds per step of
   no-grad inference, a ZO-SGD step through the callback, FO-SGD and FO-AdamW (100 M OPT-style model).
2. FP4 emulation on CUDA: ``fake_quantize`` bit-identical to the CPU result for every format,
   1D and 2D blocks, fp32 and bf16 inputs; stochastic rounding unbiased; an ``FP4Linear``
   forward/backward (nearest rounding) equal on both devices; throughput of ``fake_quantize``.
3. SOFT attention on CUDA: peak memory and time of forward+backward against PyTorch SDPA and eager
   softmax attention as the sequence grows.
Each part is guarded: a failure is printed and recorded, and the next part still runs.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")
OUT.mkdir(parents=True, exist_ok=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script's code paths
RESULTS: dict = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


N_VALUES = (4096, 16384, 65536) if DEVICE == "cuda" else (512,)
BIG = 8192 if DEVICE == "cuda" else 512


def part(name):
    def wrap(fn):
        start = time.perf_counter()
        print(f"\n=== {name}", flush=True)
        try:
            RESULTS[name] = fn()
        except Exception as error:  # noqa: BLE001 - a failed part must not stop the others
            traceback.print_exc()
            RESULTS[name] = {"error": repr(error)}
        print(f"=== {name}: {time.perf_counter() - start:.1f} s", flush=True)
        (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
        return fn

    return wrap


@part("zo_memory_cuda")
def zo_memory():
    from lightning_bpfree.zo import bench

    if DEVICE != "cuda":
        return {"skipped": "no CUDA"}

    bench.main(["--part", "memory", "--device", "cuda", "--out", str(OUT / bench.NAME), "--steps", "5"])
    return json.loads((OUT / bench.NAME / f"{bench.NAME}-memory.json").read_text())


@part("fp4_cuda_vs_cpu")
def fp4_cross_device():
    from lightning_bpfree.fp4 import FP4Linear, fake_quantize

    generator = torch.Generator().manual_seed(0)
    spread = torch.logspace(-4, 4, 1024)  # a wide dynamic range across blocks
    rows = []
    for fmt in ("nvfp4", "mxfp4", "ue5m3", "ue4m3"):
        for block_2d in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(256, 1024, generator=generator) * spread).to(dtype)
                x[0, :16] = 0  # a zero block
                cpu = fake_quantize(x, fmt, block_2d=block_2d)
                gpu = fake_quantize(x.to(DEVICE), fmt, block_2d=block_2d).cpu()
                rows.append({"fmt": fmt, "block_2d": block_2d, "dtype": str(dtype),
                             "bitwise_equal": bool(torch.equal(cpu.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                                               gpu.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)))})
    x = torch.full((4096, 1024), 0.37, device=DEVICE)
    x[:, 0] = 6.0 * 0.37 / 0.37  # pins block amax so 0.37 falls between two grid points
    sr = fake_quantize(x, "nvfp4", rounding="stochastic", generator=torch.Generator(device=DEVICE).manual_seed(0))
    sr_bias = (sr[:, 1:16].double().mean() - x[:, 1:16].double().mean()).item()
    torch.manual_seed(0)
    layer = FP4Linear(512, 256)
    inputs = torch.randn(64, 512)
    out_cpu = layer(inputs)
    layer_gpu = FP4Linear(512, 256).to(DEVICE)
    layer_gpu.load_state_dict(layer.state_dict())
    out_gpu = layer_gpu(inputs.to(DEVICE)).cpu()
    big = torch.randn(BIG, BIG, device=DEVICE)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        fake_quantize(big, "nvfp4")
    sync()
    seconds = (time.perf_counter() - start) / 10
    result = {"cross_device": rows, "all_bitwise_equal": all(r["bitwise_equal"] for r in rows),
              "stochastic_rounding_mean_bias": sr_bias, "fp4linear_forward_equal": bool(torch.equal(out_cpu, out_gpu)),
              "fp4linear_forward_max_abs_diff": (out_cpu - out_gpu).abs().max().item(),
              "fake_quantize_seconds": seconds, "fake_quantize_size": BIG, "fake_quantize_gelems_per_s": BIG * BIG / seconds / 1e9}
    print(json.dumps({k: v for k, v in result.items() if k != "cross_device"}, indent=1))
    print("all formats bit-identical CPU vs CUDA:", result["all_bitwise_equal"])
    return result


@part("soft_attention_cuda")
def soft_attention():
    import torch.nn.functional as F

    from lightning_bpfree.attention import SOFTAttention

    dim, heads = 256, 4
    rows = []
    for n in N_VALUES:
        for kind in ("soft", "sdpa", "eager"):
            if kind == "eager" and n > 16384:
                continue
            torch.cuda.empty_cache() if DEVICE == "cuda" else None
            torch.cuda.reset_peak_memory_stats() if DEVICE == "cuda" else None
            x = torch.randn(2, n, dim, device=DEVICE, requires_grad=True)
            if kind == "soft":
                layer = SOFTAttention(dim, heads).to(DEVICE)
                run = lambda layer=layer, x=x: layer(x).sum().backward()  # noqa: E731
            else:
                qkv = torch.nn.Linear(dim, 3 * dim).to(DEVICE)

                def run(x=x, qkv=qkv, kind=kind, n=n):
                    q, k, v = qkv(x).view(2, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
                    if kind == "sdpa":
                        out = F.scaled_dot_product_attention(q, k, v)
                    else:
                        out = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, -1) @ v
                    out.sum().backward()
            base = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
            run()
            sync()
            start = time.perf_counter()
            for _ in range(3):
                run()
            sync()
            rows.append({"N": n, "kind": kind, "ms": (time.perf_counter() - start) / 3 * 1e3,
                         "peak_extra_mib": ((torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0) - base) / 2**20})
            print(rows[-1], flush=True)
    return rows


print("\nwrote", OUT / "gpu_check.json")
