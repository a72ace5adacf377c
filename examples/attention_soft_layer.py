"""SOFTAttention as a plain PyTorch layer: long sequences, padding, image tokens.

    python examples/attention_soft_layer.py            # sequences up to 65,536 tokens: about 3 s on one CPU core
    python examples/attention_soft_layer.py --quick    # sequences up to 4,096 tokens: about 2 s
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_bpfree.attention import SOFTAttention, SOFTKernelAttention, gaussian_kernel

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="shorter sequences, same code path (CI)")
args = parser.parse_args()
scale = 16 if args.quick else 1  # --quick divides every sequence length by 16

torch.manual_seed(0)

# 1. A batch of sequences of different lengths, right-padded: padding never changes the real outputs.
attention = SOFTAttention(dim=64, num_heads=2, num_landmarks=49)
lengths = [3000 // scale, 1200 // scale]
x = torch.randn(2, max(lengths), 64)
padding = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
out = attention(x, key_padding_mask=padding)
alone = attention(x[1:, : lengths[1]])
print(f"padded vs alone, max |diff| at real positions: {(out[1, : lengths[1]] - alone[0]).abs().max():.2e}")

# 2. Cost is linear in N: forward + backward time as the sequence grows 4x twice.
for tokens in (4096 // scale, 16384 // scale, 65536 // scale):
    x = torch.randn(1, tokens, 64, requires_grad=True)
    start = time.perf_counter()
    attention(x).square().mean().backward()
    print(f"N={tokens:>6}: forward+backward {time.perf_counter() - start:.3f} s")

# 3. Image tokens: hw=(H, W) pools a 7x7 grid of landmarks from the 28x28 token grid.
image_tokens = torch.randn(4, 28 * 28, 64)
print("image tokens:", tuple(attention(image_tokens, hw=(28, 28)).shape))

# 4. With every token a landmark and no learned projection, the Nystrom form is the exact kernel attention.
core = SOFTKernelAttention(head_dim=8, num_landmarks=32, newton_iters=60, project_landmarks=False).double()
q, v = 0.5 * torch.randn(1, 1, 20, 8, dtype=torch.float64), torch.randn(1, 1, 20, 8, dtype=torch.float64)
print(f"exact when N <= landmarks: max |diff| = {(core(q, v) - gaussian_kernel(q, q) @ v).abs().max():.2e}")
