"""use_soft_attention on tiny transformers models built from configs (BERT, ViT, LLaMA)."""

from __future__ import annotations

import pytest
import torch

from lightning_bpfree.attention import SOFTKernelAttention, use_soft_attention
from lightning_bpfree.attention.huggingface import (
    key_padding_from_attention_mask,
    soft_attention_forward,
    soft_padding_mask,
)

transformers = pytest.importorskip("transformers")


def tiny_bert(**overrides):
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def tiny_vit():
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def test_bert_with_soft_runs_forward_and_backward():
    model = use_soft_attention(tiny_bert(), num_landmarks=4)
    assert model.config._attn_implementation == "soft"
    layers = [m for m in model.modules() if isinstance(m, SOFTKernelAttention)]
    assert len(layers) == 2 and layers[0].num_landmarks == 4
    ids = torch.randint(5, 100, (3, 12))
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 0]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert layers[0].landmark_proj.weight.grad.abs().max() > 0
    bert_attention = model.bert.encoder.layer[0].attention.self
    assert bert_attention.query.weight.grad.abs().max() > 0
    assert bert_attention.key.weight.grad is None  # SOFT ties keys to queries


def test_bert_padding_mask_arrives_and_padding_never_changes_real_outputs():
    model = use_soft_attention(tiny_bert(), num_landmarks=4).eval()
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    batched = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    alone = model.bert(input_ids=ids[1:, :7]).last_hidden_state
    torch.testing.assert_close(batched[1, :7], alone[0], rtol=1e-5, atol=1e-5)
    # Were the mask dropped on the way (as with AttentionInterface alone), the padded tokens would count.
    unmasked = model.bert(input_ids=ids, attention_mask=torch.ones_like(mask)).last_hidden_state
    assert (unmasked[1, :7] - alone[0]).abs().max() > 1e-3


def test_switching_back_to_sdpa_restores_the_original_outputs():
    model = tiny_bert().eval()
    ids = torch.randint(5, 100, (2, 10))
    before = model.bert(input_ids=ids).last_hidden_state
    use_soft_attention(model)
    assert (model.bert(input_ids=ids).last_hidden_state - before).abs().max() > 1e-2
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(model.bert(input_ids=ids).last_hidden_state, before)


def test_vit_with_soft_runs_forward_and_backward_and_learns():
    torch.manual_seed(0)
    model = use_soft_attention(tiny_vit(), num_landmarks=8, normalize=True)
    images, labels = torch.randn(12, 1, 16, 16), torch.arange(12) % 3
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(pixel_values=images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_causal_decoder_models_are_rejected():
    from lightning_bpfree.models import tiny_causal_lm

    with pytest.raises(ValueError, match="cannot be causal"):
        use_soft_attention(tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match="decoder"):
        use_soft_attention(tiny_bert(is_decoder=True))


def test_cross_attention_and_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="cross-attention"):
        use_soft_attention(tiny_bert(is_decoder=True, add_cross_attention=True))
    with pytest.raises(TypeError, match="unknown SOFT option"):
        use_soft_attention(tiny_bert(), num_landmark=4)
    with pytest.raises(ValueError, match="num_landmarks"):
        use_soft_attention(tiny_bert(), num_landmarks=0)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        use_soft_attention(torch.nn.Linear(3, 3))


def test_attention_function_rejects_masks_that_are_not_padding():
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None].expand(2, 1, 5, 5)
    with pytest.raises(ValueError, match="differs between queries"):
        key_padding_from_attention_mask(causal, 2, 5)
    with pytest.raises(ValueError, match="shape"):
        key_padding_from_attention_mask(torch.ones(2, 1, 5, 4, dtype=torch.bool), 2, 5)
    padding = torch.tensor([[True, True, True, False, False]])[:, None, None, :].expand(1, 1, 5, 5).clone()
    padding[:, :, 3:] = False  # padded query rows see nothing in some mask layouts
    additive = torch.zeros(1, 1, 5, 5).masked_fill(~padding, torch.finfo(torch.float32).min)
    expected = torch.tensor([[False, False, False, True, True]])
    assert torch.equal(key_padding_from_attention_mask(padding, 1, 5), expected)
    assert torch.equal(key_padding_from_attention_mask(additive, 1, 5), expected)


def test_mask_hook_passes_padding_compactly_and_other_masks_in_full():
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    padding = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    hook_kwargs = dict(
        batch_size=2, q_length=4, kv_length=4, attention_mask=padding, allow_is_causal_skip=False,
        allow_is_bidirectional_skip=True, dtype=torch.float32, use_vmap=False, device="cpu",
    )  # fmt: skip
    compact = soft_padding_mask(mask_function=bidirectional_mask_function, **hook_kwargs)
    assert compact.shape == (2, 1, 1, 4) and compact.dtype == torch.bool
    assert torch.equal(key_padding_from_attention_mask(compact, 2, 4), padding == 0)
    assert (
        soft_padding_mask(mask_function=bidirectional_mask_function, **{**hook_kwargs, "attention_mask": None}) is None
    )
    causal = soft_padding_mask(mask_function=causal_mask_function, **hook_kwargs)
    assert causal.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="differs between queries"):
        key_padding_from_attention_mask(causal, 2, 4)


def test_attention_function_needs_the_core_and_self_attention():
    layer = torch.nn.Module()
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="use_soft_attention"):
        soft_attention_forward(layer, q, q, q, None)
    layer.soft_attention = SOFTKernelAttention(4, num_landmarks=3)
    with pytest.raises(ValueError, match="self-attention only"):
        soft_attention_forward(layer, q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), None)
    out, weights = soft_attention_forward(layer, q, q, q, None)
    assert out.shape == (1, 6, 2, 4) and weights is None


def _soft_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".soft_attention." in k}


def test_save_pretrained_round_trip_restores_soft_attention(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = use_soft_attention(tiny_bert(), num_landmarks=4, normalize=True, value_conv_kernel=3).eval()
    for parameter in model.parameters():  # trained-looking SOFT weights, not their initial values
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    before = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)

    loaded = use_soft_attention(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)).eval()
    assert loaded.config._attn_implementation == "soft"
    assert loaded.config.soft_attention == model.config.soft_attention
    assert loaded.config.soft_attention["num_landmarks"] == 4 and loaded.config.soft_attention["normalize"]
    saved, restored = _soft_weights(model), _soft_weights(loaded)
    assert saved.keys() == restored.keys() and len(saved) > 0
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    after = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(after, before, atol=1e-6)


def test_soft_weights_load_into_the_base_model_of_a_task_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = use_soft_attention(tiny_bert(), num_landmarks=4).eval()
    model.save_pretrained(tmp_path)
    base = use_soft_attention(transformers.AutoModel.from_pretrained(tmp_path)).eval()
    ids = torch.randint(5, 100, (1, 9))
    torch.testing.assert_close(base(input_ids=ids).last_hidden_state, model.bert(input_ids=ids).last_hidden_state)


def test_soft_checkpoint_loaded_without_the_switch_fails_loudly(tmp_path):
    model = use_soft_attention(tiny_bert(), num_landmarks=4)
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert plain.config._attn_implementation == "soft"
    with pytest.raises(ValueError, match="saved with SOFT attention"):
        plain(input_ids=torch.randint(5, 100, (1, 6)))


def test_options_that_contradict_the_saved_settings_are_refused_and_change_nothing(tmp_path):
    model = use_soft_attention(tiny_bert(), num_landmarks=4)
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="soft_attention"):
        use_soft_attention(plain, num_landmarks=8)
    assert not any(isinstance(m, SOFTKernelAttention) for m in plain.modules())
    # The same options as saved are fine and restore the saved weights.
    restored = use_soft_attention(plain, num_landmarks=4)
    assert all(torch.equal(a, b) for a, b in zip(_soft_weights(model).values(), _soft_weights(restored).values()))


def test_partial_soft_weights_in_a_checkpoint_raise(tmp_path):
    from safetensors.torch import load_file, save_file

    model = use_soft_attention(tiny_bert(), num_landmarks=4)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if ".soft_attention." in k)
    save_file(
        {k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors", metadata={"format": "pt"}
    )
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no SOFT weight"):
        use_soft_attention(plain)
    assert not any(isinstance(m, SOFTKernelAttention) for m in plain.modules())


def test_released_code_options_pass_through_and_survive_saving(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = use_soft_attention(tiny_bert(), num_landmarks=4, ridge=0.01, landmark_bias=False).eval()
    cores = [m for m in model.modules() if isinstance(m, SOFTKernelAttention)]
    assert all(core.ridge == 0.01 and core.landmark_proj.bias is None for core in cores)
    assert model.config.soft_attention["ridge"] == 0.01 and model.config.soft_attention["landmark_bias"] is False
    ids = torch.randint(5, 100, (2, 12))
    before = model(input_ids=ids).logits
    # The ridge reaches the layers: without it the same weights give other outputs.
    for core in cores:
        core.ridge = 0.0
    assert (model(input_ids=ids).logits - before).abs().max() > 1e-6
    for core in cores:
        core.ridge = 0.01
    model.save_pretrained(tmp_path)
    loaded = use_soft_attention(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)).eval()
    assert loaded.config.soft_attention == model.config.soft_attention
    torch.testing.assert_close(loaded(input_ids=ids).logits, before, rtol=0, atol=1e-6)
