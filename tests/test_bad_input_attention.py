"""Bad input at every public SOFT entry point: a clear error naming the argument, or the documented
non-finite behaviour (a non-finite real token makes its own sequence's outputs NaN, nothing else)."""

from __future__ import annotations

import pytest
import torch

from lightning_bpfree.attention import SOFTAttention, SOFTKernelAttention, newton_pinv, newton_schulz_pinv


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dim": 10, "num_heads": 4}, ValueError, "dim"),
        ({"dim": 0, "num_heads": 1}, ValueError, "dim"),
        ({"dim": 8.0, "num_heads": 2}, TypeError, "dim"),
        ({"dim": 8, "num_heads": 0}, ValueError, "num_heads"),
        ({"dim": 8, "num_heads": True}, TypeError, "num_heads"),
        ({"dim": 8, "num_heads": 2, "num_landmarks": 0}, ValueError, "num_landmarks"),
        ({"dim": 8, "num_heads": 2, "num_landmarks": float("nan")}, TypeError, "num_landmarks"),
        ({"dim": 8, "num_heads": 2, "newton_iters": -1}, ValueError, "newton_iters"),
        ({"dim": 8, "num_heads": 2, "normalize": "false"}, TypeError, "normalize"),
        ({"dim": 8, "num_heads": 2, "qkv_bias": 1}, TypeError, "qkv_bias"),
        ({"dim": 8, "num_heads": 2, "landmarks": "random"}, ValueError, "landmarks"),
        ({"dim": 8, "num_heads": 2, "conv_stride": 0}, ValueError, "conv_stride"),
        ({"dim": 8, "num_heads": 2, "project_landmarks": "yes"}, TypeError, "project_landmarks"),
        ({"dim": 8, "num_heads": 2, "value_conv_kernel": 2}, ValueError, "value_conv_kernel"),
        ({"dim": 8, "num_heads": 2, "num_landmark": 4}, TypeError, "num_landmark"),
        ({"dim": 8, "num_heads": 2, "head_dim": 4}, TypeError, "head_dim"),
    ],
)
def test_soft_attention_constructor(kwargs, error, match):
    with pytest.raises(error, match=match):
        SOFTAttention(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"head_dim": 0}, ValueError, "head_dim"),
        ({"head_dim": 4, "num_landmarks": -2}, ValueError, "num_landmarks"),
        ({"head_dim": 4, "normalize": None}, TypeError, "normalize"),
        ({"head_dim": 4, "value_conv_kernel": 0}, ValueError, "value_conv_kernel"),
    ],
)
def test_kernel_attention_constructor(kwargs, error, match):
    with pytest.raises(error, match=match):
        SOFTKernelAttention(**kwargs)


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return SOFTAttention(8, 2, num_landmarks=3)


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (torch.randn(2, 6, 7), {}, ValueError, "x must be"),
        (torch.randn(6, 8), {}, ValueError, "x must be"),
        (torch.ones(2, 6, 8, dtype=torch.long), {}, TypeError, "x must be"),
        ([[0.0] * 8], {}, TypeError, "x must be"),
        (torch.randn(2, 6, 8), {"key_padding_mask": torch.zeros(2, 6)}, TypeError, "key_padding_mask"),
        (torch.randn(2, 6, 8), {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}, ValueError,
         "key_padding_mask"),
        (torch.randn(2, 6, 8), {"key_padding_mask": torch.zeros(6, dtype=torch.bool)}, ValueError,
         "key_padding_mask"),
        (torch.randn(2, 6, 8), {"hw": (2, 2)}, ValueError, "hw"),
        (torch.randn(2, 6, 8), {"hw": (2.0, 3)}, TypeError, "hw"),
        (torch.randn(2, 6, 8), {"hw": 6}, TypeError, "hw"),
        (torch.randn(2, 6, 8), {"hw": (6, 1, 1)}, TypeError, "hw"),
        (torch.randn(2, 6, 8), {"hw": (-2, -3)}, ValueError, "hw"),
    ],
)  # fmt: skip
def test_forward_bad_input(layer, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        layer(x, **kwargs)


def test_kernel_attention_forward_bad_input():
    core = SOFTKernelAttention(4, num_landmarks=3)
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="q and v"):
        core(q, torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="head_dim"):
        core(torch.randn(1, 2, 6, 3), torch.randn(1, 2, 6, 3))
    with pytest.raises(TypeError, match="q must be"):
        core(q.long(), q)
    with pytest.raises(TypeError, match="v must be"):
        core(q, "v")


def test_empty_sequence_gives_an_empty_output(layer):
    assert layer(torch.randn(2, 0, 8)).shape == (2, 0, 8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_token_makes_only_its_own_sequence_nan(layer, bad):
    x = torch.randn(2, 6, 8)
    x[0, 2, 3] = bad
    out = layer(x)
    assert torch.isnan(out[0]).all()  # documented: the whole sequence, every position
    torch.testing.assert_close(out[1], layer(x[1:])[0])


def test_a_non_finite_value_at_a_padded_position_changes_nothing(layer):
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[False, False, False, False, True, True]])
    clean = layer(x, key_padding_mask=mask)
    x[0, 5] = float("nan")
    x[0, 4] = float("inf")
    poisoned = layer(x, key_padding_mask=mask)
    torch.testing.assert_close(poisoned[0, :4], clean[0, :4])


@pytest.mark.parametrize(
    "A, iters, error, match",
    [
        (torch.eye(3, dtype=torch.long), 5, TypeError, "A must be"),
        ([[1.0]], 5, TypeError, "A must be"),
        (torch.ones(3), 5, ValueError, "A must have"),
        (torch.ones(0, 3), 5, ValueError, "A must have"),
        (torch.eye(3), -1, ValueError, "iters"),
        (torch.eye(3), 2.0, TypeError, "iters"),
    ],
)
def test_pinv_bad_input(A, iters, error, match):
    for function in (newton_pinv, newton_schulz_pinv):
        with pytest.raises(error, match=match):
            function(A, iters)


def test_pinv_of_a_non_square_matrix_is_the_pseudo_inverse():
    A = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(newton_pinv(A, 60), torch.linalg.pinv(A))
    torch.testing.assert_close(newton_pinv(A.T, 60), torch.linalg.pinv(A.T))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_matrix_gives_a_nan_pinv_and_leaves_the_others_alone(bad):
    A = torch.eye(3).repeat(2, 1, 1) * 2
    A[0, 1, 2] = bad
    V = newton_pinv(A, 30)
    assert torch.isnan(V[0]).all()
    torch.testing.assert_close(V[1], torch.eye(3) / 2)


def test_use_soft_attention_bad_input():
    transformers = pytest.importorskip("transformers")
    from lightning_bpfree.attention import use_soft_attention

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertModel(config)
    with pytest.raises(TypeError, match="num_landmark"):
        use_soft_attention(model, num_landmark=4)
    with pytest.raises(ValueError, match="num_landmarks"):
        use_soft_attention(model, num_landmarks=0)
    with pytest.raises(TypeError, match="normalize"):
        use_soft_attention(model, normalize="true")
    with pytest.raises(TypeError, match="transformers"):
        use_soft_attention(torch.nn.Linear(3, 3))
    model.config.soft_attention = {"landmark_count": 3}
    with pytest.raises(ValueError, match="soft_attention"):
        use_soft_attention(model)
    del model.config.soft_attention
    # every failure above left the model as it came
    assert model.config._attn_implementation != "soft"
    assert not any(isinstance(m, SOFTKernelAttention) for m in model.modules())
