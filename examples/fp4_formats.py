"""Quantize one tensor to every FP4 format: error, packed size, and a look at the NVFP4 packed form.

    python examples/fp4_formats.py            # a 256 x 1024 tensor: about 2 s on one CPU core
    python examples/fp4_formats.py --quick    # a 64 x 256 tensor: about 2 s
"""

import argparse

import torch

from lightning_bpfree.fp4 import FORMATS, dequantize, fake_quantize, quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller tensors, same code path (CI)")
    args = parser.parse_args()
    rows, cols = (64, 256) if args.quick else (256, 1024)

    torch.manual_seed(0)
    # Activations with a few outlier channels, the case block scales and the Hadamard transform target.
    x = torch.randn(rows, cols)
    x[:, ::97] *= 20
    print(f"{'format':<11} {'block':>5} {'rel. error':>10} {'bytes':>8} {'bits/elt':>8}")
    for name, fmt in FORMATS.items():
        q = quantize(x, name)
        error = (dequantize(q) - x).norm() / x.norm()
        print(f"{name:<11} {fmt.block_size:>5} {error:>10.4f} {q.nbytes:>8} {8 * q.nbytes / x.numel():>8.3f}")
    w = torch.randn(2 * rows, cols) * 0.02
    for block_2d in (False, True):
        error = (fake_quantize(w, block_2d=block_2d) - w).norm() / w.norm()
        print(f"nvfp4 weight, {'16x16 tiles' if block_2d else '1x16 blocks'}: rel. error {error:.4f}")
    q = quantize(x[:1, :16])
    print("first block codes (two a byte):", [f"{b:02x}" for b in q.codes[0].tolist()])
    print("block scale:", q.block_scales().item(), "tensor scale:", q.tensor_scale.item())


if __name__ == "__main__":
    main()
