"""SOFT numerics: Newton pseudo-inverse and its gradient, the kernel, padding invariance, linear cost."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_bpfree.attention import SOFTAttention, SOFTKernelAttention, gaussian_kernel, newton_pinv
from lightning_bpfree.attention.soft import grid_pooling_matrix, segment_pooling_matrix


def spd_matrix(n: int, condition: float, seed: int = 0) -> torch.Tensor:
    """A float64 SPD matrix with eigenvalues log-spaced from 1 down to 1 / condition."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    eigenvalues = torch.logspace(0, -math.log10(condition), n, dtype=torch.float64)
    return basis @ torch.diag(eigenvalues) @ basis.T


@pytest.mark.parametrize("condition", [10.0, 1e2, 1e3, 1e4, 1e6])
def test_newton_pinv_converges_to_pinv_with_documented_iterations(condition):
    A = spd_matrix(32, condition)
    iters = math.ceil(2 * math.log2(condition) + 10)
    V = newton_pinv(A, iters)
    expected = torch.linalg.pinv(A)
    assert (V - expected).norm() / expected.norm() < 1e-6
    # Far fewer iterations than the rule leave a visible error: the rule is not slack.
    short = newton_pinv(A, max(1, iters // 2 - 3))
    assert (short - expected).norm() / expected.norm() > 1e-3


def test_newton_pinv_of_rank_deficient_and_rectangular_matrices():
    block = torch.zeros(6, 6, dtype=torch.float64)
    block[:4, :4] = spd_matrix(4, 5.0)
    torch.testing.assert_close(newton_pinv(block, 40), torch.linalg.pinv(block), rtol=1e-8, atol=1e-10)
    tall = torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(newton_pinv(tall, 60), torch.linalg.pinv(tall), rtol=1e-8, atol=1e-10)


def test_newton_pinv_batched_and_half_precision():
    A = torch.stack([spd_matrix(8, 4.0, seed) for seed in range(3)]).float()
    V = newton_pinv(A, 30)
    torch.testing.assert_close(V, torch.linalg.inv(A), rtol=1e-4, atol=1e-4)
    V_bf16 = newton_pinv(A.bfloat16(), 30)
    assert V_bf16.dtype == torch.bfloat16
    # Computed in float32 then rounded once: only bf16's last-bit error remains.
    assert ((V_bf16.float() - V) / V.abs().max()).abs().max() < 1e-2


def test_newton_pinv_backward_equals_autograd_through_inverse():
    A = spd_matrix(8, 20.0).requires_grad_(True)
    weights = torch.randn(8, 8, dtype=torch.float64)
    (ours,) = torch.autograd.grad((newton_pinv(A, 40) * weights).sum(), A)
    (reference,) = torch.autograd.grad((torch.linalg.inv(A) * weights).sum(), A)
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-10)


def test_newton_pinv_backward_equals_autograd_through_pinv_when_rank_deficient():
    # The shape of the padded landmark kernel: a real block and zero rows/columns.
    A = torch.zeros(6, 6, dtype=torch.float64)
    A[:4, :4] = spd_matrix(4, 5.0)
    A.requires_grad_(True)
    weights = torch.randn(6, 6, dtype=torch.float64)
    (ours,) = torch.autograd.grad((newton_pinv(A, 60) * weights).sum(), A)
    (reference,) = torch.autograd.grad((torch.linalg.pinv(A) * weights).sum(), A)
    assert reference[4:, :4].abs().max() > 1e-3  # the projector terms matter here
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-8)


def test_newton_pinv_gradient_matches_finite_differences():
    A = (torch.randn(5, 5, dtype=torch.float64) + 4 * torch.eye(5, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda M: newton_pinv(M, 50), (A,), eps=1e-6, atol=1e-6)


def test_newton_pinv_keeps_no_graph_of_its_iterations():
    A = spd_matrix(8, 10.0).requires_grad_(True)
    V = newton_pinv(A, 200)
    # The only edge goes straight back to A: the 200 iterations are not recorded.
    assert [type(fn).__name__ for fn, _ in V.grad_fn.next_functions] == ["AccumulateGrad"]


def test_newton_pinv_rejects_bad_input():
    with pytest.raises(ValueError, match="iters"):
        newton_pinv(torch.eye(3), -1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        newton_pinv(torch.ones(3), 5)
    with pytest.raises(TypeError, match="floating-point"):
        newton_pinv(torch.eye(3, dtype=torch.long), 5)


def test_gaussian_kernel_equals_direct_computation():
    x, y = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    direct = torch.exp(-0.5 * ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1))
    torch.testing.assert_close(gaussian_kernel(x, y), direct)
    assert torch.allclose(torch.diagonal(gaussian_kernel(x, x), dim1=-2, dim2=-1), torch.ones(2, 7, dtype=x.dtype))


def test_segment_pooling_uses_real_tokens_only():
    valid = torch.tensor([[True] * 6 + [False] * 2, [False, True, True, False, True, True, True, True]])
    weights, landmark_valid = segment_pooling_matrix(valid, 3)
    expected_first = torch.tensor(
        [[0.5, 0.5, 0, 0, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0.5, 0.5, 0, 0]]
    )
    torch.testing.assert_close(weights[0], expected_first)
    assert weights[1][:, ~valid[1]].abs().sum() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    assert landmark_valid.all()
    square, _ = grid_pooling_matrix(torch.ones(1, 196, dtype=torch.bool), (14, 14), 49)
    assert square.shape == (1, 49, 196)
    short, short_valid = segment_pooling_matrix(torch.tensor([[True, True, False, False]]), 3)
    assert short_valid.tolist() == [[True, True, False]]
    torch.testing.assert_close(short[0, :2], torch.eye(4)[:2])


def test_grid_pooling_matches_adaptive_avg_pool():
    tokens = torch.randn(1, 6 * 9)
    # 9 landmarks on a 6 x 9 grid: 2 x 4 cells keep the aspect ratio.
    weights, landmark_valid = grid_pooling_matrix(torch.ones(1, 54, dtype=torch.bool), (6, 9), 9)
    pooled = (weights @ tokens.unsqueeze(-1)).reshape(2, 4)
    expected = torch.nn.functional.adaptive_avg_pool2d(tokens.reshape(1, 1, 6, 9), (2, 4))[0, 0]
    torch.testing.assert_close(pooled, expected)
    assert landmark_valid.all()


def test_nystrom_form_is_exact_when_every_token_is_a_landmark():
    core = SOFTKernelAttention(8, num_landmarks=16, newton_iters=60, project_landmarks=False).double()
    q = 0.5 * torch.randn(2, 3, 10, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    exact = gaussian_kernel(q, q) @ v
    torch.testing.assert_close(core(q, v), exact, rtol=1e-6, atol=1e-8)


def test_soft_core_equals_its_formula():
    # The reference uses neither the layer's kernel nor its pseudo-inverse: torch.cdist for the Gaussian
    # kernel, torch.linalg.pinv for the inverse, the landmark maps written out from their weights.
    torch.manual_seed(0)
    core = SOFTKernelAttention(4, num_landmarks=3, newton_iters=100, normalize=True).double()
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    v = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    pooled = q.reshape(1, 2, 3, 3, 4).mean(-2)  # 9 tokens -> 3 segments of 3
    projected = pooled @ core.landmark_proj.weight.T + core.landmark_proj.bias
    centred = projected - projected.mean(-1, keepdim=True)
    normed = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + core.landmark_norm.eps)
    normed = normed * core.landmark_norm.weight + core.landmark_norm.bias
    landmarks = 0.5 * normed * (1 + torch.erf(normed / math.sqrt(2)))  # exact GELU

    def kernel(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / 2)

    kernel_ll = kernel(landmarks, landmarks)
    inv_sqrt_degree = kernel_ll.sum(-1).rsqrt()
    inverse = inv_sqrt_degree[..., :, None] * torch.linalg.pinv(kernel_ll) * inv_sqrt_degree[..., None, :]
    kernel_ql = kernel(q, landmarks)
    expected = kernel_ql @ inverse @ kernel_ql.transpose(-1, -2) @ v
    torch.testing.assert_close(core(q, v), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"normalize": True},
        {"value_conv_kernel": 3},
        {"num_landmarks": 20},  # more landmarks than the shortest sequence has tokens
    ],
)
def test_padding_never_changes_outputs_at_real_positions(options):
    attention = SOFTAttention(32, 4, num_landmarks=options.pop("num_landmarks", 5), **options).double()
    lengths = [11, 7, 16]
    sequences = [torch.randn(n, 32, dtype=torch.float64) for n in lengths]
    unpadded = [attention(s[None])[0] for s in sequences]
    # Right padding, left padding and padding in the middle, filled with large junk values.
    batch = torch.randn(3, 20, 32, dtype=torch.float64) * 100
    padding = torch.ones(3, 20, dtype=torch.bool)
    positions = [torch.arange(11), torch.arange(13, 20), torch.cat([torch.arange(0, 8), torch.arange(12, 20)])]
    for row, (seq, pos) in enumerate(zip(sequences, positions)):
        batch[row, pos] = seq
        padding[row, pos] = False
    if "value_conv_kernel" in options:  # the depthwise convolution sees neighbours: contiguous tokens only
        positions[2] = torch.arange(4, 20)
        batch[2], padding[2] = torch.randn(20, 32, dtype=torch.float64) * 100, True
        batch[2, positions[2]], padding[2, positions[2]] = sequences[2], False
    out = attention(batch, key_padding_mask=padding)
    for row, pos in enumerate(positions):
        torch.testing.assert_close(out[row, pos], unpadded[row], rtol=1e-9, atol=1e-9)


def test_padded_tokens_get_no_gradient_through_real_outputs():
    attention = SOFTAttention(16, 2, num_landmarks=4)
    x = torch.randn(2, 12, 16, requires_grad=True)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[0, 9:] = True
    attention(x, key_padding_mask=padding)[~padding].sum().backward()
    assert x.grad[0, 9:].abs().max() == 0
    assert x.grad[0, :9].abs().max() > 0


def test_conv_landmarks_grow_with_length_and_ignore_right_padding():
    core = SOFTKernelAttention(4, landmarks="conv", conv_stride=4).double()
    q, v = torch.randn(1, 2, 16, 4, dtype=torch.float64), torch.randn(1, 2, 16, 4, dtype=torch.float64)
    _, valid16 = core._landmarks(q, torch.ones(1, 16, dtype=torch.bool), None)
    _, valid64 = core._landmarks(q.repeat(1, 1, 4, 1), torch.ones(1, 64, dtype=torch.bool), None)
    assert valid16.shape[-1] == 4 and valid64.shape[-1] == 16
    padded_q = torch.cat([q, torch.randn(1, 2, 6, 4, dtype=torch.float64)], dim=2)
    padded_v = torch.cat([v, torch.randn(1, 2, 6, 4, dtype=torch.float64)], dim=2)
    padding = torch.tensor([[False] * 16 + [True] * 6])
    torch.testing.assert_close(core(padded_q, padded_v, key_padding_mask=padding)[:, :, :16], core(q, v))


def test_image_tokens_use_a_landmark_grid_and_train():
    torch.manual_seed(0)
    attention = SOFTAttention(16, 2, num_landmarks=16, value_conv_kernel=3)
    x = torch.randn(4, 64, 16)
    target = torch.randn(4, 64, 16)
    optimizer = torch.optim.Adam(attention.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(attention(x, hw=(8, 8)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(p.grad is not None for p in attention.parameters())


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_intermediate_grows_faster_than_linear_in_tokens():
    attention = SOFTAttention(32, 2, num_landmarks=16, value_conv_kernel=3)
    largest = {}
    for tokens in (1024, 4096):
        x = torch.randn(1, tokens, 32, requires_grad=True)
        with _LargestTensor() as probe:
            attention(x, key_padding_mask=torch.zeros(1, tokens, dtype=torch.bool)).sum().backward()
        largest[tokens] = probe.largest
    # Largest tensors are [B, N, m+1] / [B, N, C]: linear in N and far from the N^2 = 16.8M of softmax.
    assert largest[4096] <= 4.01 * largest[1024]
    assert largest[4096] < 4096 * 64


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SOFTAttention(30, 4)
    with pytest.raises(ValueError, match="num_landmarks"):
        SOFTAttention(32, 4, num_landmarks=0)
    with pytest.raises(ValueError, match="landmarks must be one of"):
        SOFTAttention(32, 4, landmarks="random")
    with pytest.raises(ValueError, match="value_conv_kernel"):
        SOFTAttention(32, 4, value_conv_kernel=4)
    attention = SOFTAttention(32, 4)
    x = torch.randn(2, 10, 32)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        attention(x, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        attention(x, key_padding_mask=torch.zeros(2, 10))
    with pytest.raises(ValueError, match="H \\* W == N"):
        attention(x, hw=(3, 3))
    with pytest.raises(ValueError, match="x must be"):
        attention(torch.randn(2, 10, 16))


def test_bf16_attention_stays_close_to_float32():
    attention = SOFTAttention(32, 2, num_landmarks=8)
    x = torch.randn(2, 64, 32)
    reference = attention(x)
    x_bf16 = x.bfloat16().requires_grad_(True)
    out = attention.bfloat16()(x_bf16)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x_bf16.grad).all()
    assert (out.float() - reference).norm() / reference.norm() < 2e-2


@pytest.mark.parametrize("ridge", [0.01, 0.5])
def test_newton_pinv_with_ridge_inverts_the_shifted_matrix(ridge):
    A = spd_matrix(16, 10.0)
    shifted = A + ridge * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(newton_pinv(A, 40, ridge=ridge), torch.linalg.inv(shifted), rtol=1e-10, atol=1e-12)
    # The ridge is not negligible: with eigenvalues 1 ... 0.1 it moves the inverse by 6.8 % (ridge 0.01).
    moved = (torch.linalg.inv(shifted) - torch.linalg.pinv(A)).norm() / torch.linalg.pinv(A).norm()
    assert moved > 0.05
    A.requires_grad_(True)
    weights = torch.randn(16, 16, dtype=torch.float64)
    (ours,) = torch.autograd.grad((newton_pinv(A, 40, ridge=ridge) * weights).sum(), A)
    (reference,) = torch.autograd.grad((torch.linalg.inv(A + ridge * torch.eye(16, dtype=A.dtype)) * weights).sum(), A)
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-10)


def test_newton_pinv_without_ridge_is_the_moore_penrose_inverse():
    A = torch.zeros(6, 6, dtype=torch.float64)
    A[:4, :4] = spd_matrix(4, 5.0)
    torch.testing.assert_close(newton_pinv(A, 40, ridge=0.0), torch.linalg.pinv(A), rtol=1e-8, atol=1e-10)


def test_ridge_needs_a_square_matrix_and_a_nonnegative_value():
    with pytest.raises(ValueError, match="square"):
        newton_pinv(torch.randn(4, 3, dtype=torch.float64), 5, ridge=0.01)
    with pytest.raises(ValueError, match="ridge"):
        newton_pinv(torch.eye(3), 5, ridge=-0.1)
    with pytest.raises(ValueError, match="ridge"):
        SOFTAttention(16, 2, ridge=-1.0)


@pytest.mark.parametrize("landmarks", ["conv", "pool"])
def test_landmark_bias_false_has_no_bias_parameter(landmarks):
    with_bias = SOFTAttention(16, 2, landmarks=landmarks, conv_stride=2)
    without = SOFTAttention(16, 2, landmarks=landmarks, conv_stride=2, landmark_bias=False)
    op = "landmark_conv" if landmarks == "conv" else "landmark_proj"
    assert getattr(with_bias.core, op).bias is not None
    assert getattr(without.core, op).bias is None
    names = {name for name, _ in without.named_parameters()}
    assert f"core.{op}.weight" in names and f"core.{op}.bias" not in names
    assert without(torch.randn(1, 16, 16), hw=(4, 4)).shape == (1, 16, 16)


def released_soft_forward(layer: SOFTAttention, x: torch.Tensor, H: int, W: int, iters: int) -> torch.Tensor:
    """fudan-zvg/SOFT's SoftmaxFreeAttention.forward (models/softmax_free_transformer.py, inverse.py:
    newton_inv), written out from its formulas with the weights of ``layer``."""
    b, n, dim = x.shape
    heads, d = layer.num_heads, layer.head_dim
    core = layer.core

    def split(t):
        return t.reshape(b, n, heads, d).transpose(1, 2)

    Q = split(x @ layer.query.weight.T + layer.query.bias) / math.sqrt(math.sqrt(d))
    V = split(x @ layer.value.weight.T + layer.value.bias)
    grid = Q.reshape(b * heads, H, W, d).permute(0, 3, 1, 2)
    landmarks = torch.nn.functional.conv2d(grid, core.landmark_conv.weight, stride=core.conv_stride)
    landmarks = landmarks.flatten(2).transpose(1, 2).reshape(b, heads, -1, d)
    landmarks = torch.nn.functional.gelu(
        torch.nn.functional.layer_norm(landmarks, (d,), core.landmark_norm.weight, core.landmark_norm.bias)
    )

    def kernel(q, k):  # ||q||^2 + ||k||^2 - 2 q.k, then exp(-x / 2)
        ones_k = torch.ones(d, k.shape[-2], dtype=q.dtype)
        ones_q = torch.ones(q.shape[-2], d, dtype=q.dtype)
        return torch.exp(-((q**2) @ ones_k + ones_q @ (k**2).transpose(-1, -2) - 2 * q @ k.transpose(-1, -2)) / 2)

    kernel_1 = kernel(Q, landmarks)
    kernel_2 = kernel(landmarks, landmarks)
    P = kernel_2 + 0.01 * torch.eye(kernel_2.shape[-1], dtype=x.dtype)
    alpha = 0.9 * 2 / torch.max(torch.sum(kernel_2, dim=-1), -1)[0] ** 2
    inverse = alpha[..., None, None] * P
    for _ in range(iters):
        inverse = 2 * inverse - inverse @ P @ inverse
    out = (kernel_1 @ inverse) @ (kernel_1.transpose(-1, -2) @ V)
    out = out.transpose(1, 2).reshape(b, n, heads * d)
    return out @ layer.out.weight.T + layer.out.bias


def test_ridge_and_no_landmark_bias_reproduce_the_released_layer():
    torch.manual_seed(0)
    layer = SOFTAttention(
        16, 2, landmarks="conv", conv_stride=2, qkv_bias=True, ridge=0.01, landmark_bias=False, newton_iters=20
    ).double()
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    ours = layer(x, hw=(8, 8))
    released = released_soft_forward(layer, x, 8, 8, 20)
    assert (ours - released).abs().max() < 1e-12
    # The default (pseudo-inverse, no ridge) is a different layer: the ridge is visible in the output.
    layer.core.ridge = 0.0
    assert (layer(x, hw=(8, 8)) - released).abs().max() > 1e-6
    layer.core.ridge = 0.01
    # Gradients: the released backward is that of the exact inverse, so compare where the iteration converged.
    layer.core.newton_iters = 60
    ours_grads = torch.autograd.grad(layer(x, hw=(8, 8)).pow(2).sum(), list(layer.parameters()))
    released_grads = torch.autograd.grad(
        released_soft_forward(layer, x, 8, 8, 60).pow(2).sum(), list(layer.parameters()), allow_unused=True
    )
    for mine, theirs in zip(ours_grads, released_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)
