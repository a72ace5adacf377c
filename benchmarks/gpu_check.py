"""One prepared script for a lent CUDA GPU (not part of the test suite; CI has no GPU).

    PYTHONPATH=. python3 benchmarks/gpu_check.py OUT_DIR

1. ``bpfree zo-bench --part memory`` on CUDA: peak ``torch.cuda.max_memory_allocated`` and seconds per step of
   no-grad inference, a ZO-SGD step through the callback, FO-SGD and FO-AdamW (100 M OPT-style model).
2. FP4 emulation on CUDA (``lightning_bpfree.fp4.bench.cross_device_check``, the code the ``gpu`` tests run):
   ``fake_quantize`` and the packed codes and scales of ``quantize`` bit-identical to the CPU result for
   every format, 1D and 2D blocks, fp32 and bf16 inputs; stochastic rounding's mean against its exact
   expectation; an ``FP4Linear`` forward/backward (nearest rounding) equal on both devices up to float32
   accumulation order; throughput of ``fake_quantize``.
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
    # the comparison itself is lightning_bpfree.fp4.bench.cross_device_check, which the tests marked `gpu`
    # (tests/test_claims_fp4.py) also run, so the figures here and the test's assertions come from one code
    from lightning_bpfree.fp4 import fake_quantize
    from lightning_bpfree.fp4.bench import cross_device_check

    result = cross_device_check(DEVICE)
    big = torch.randn(BIG, BIG, device=DEVICE)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        fake_quantize(big, "nvfp4")
    sync()
    seconds = (time.perf_counter() - start) / 10
    result.update(fake_quantize_seconds=seconds, fake_quantize_size=BIG, fake_quantize_gelems_per_s=BIG * BIG / seconds / 1e9)
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=1))
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
