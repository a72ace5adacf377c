"""NVFP4Precision / FP4Precision in a Lightning Trainer on CPU: conversion, training, checkpoints, switch, TE dispatch."""

import sys
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree import FP4Precision, FP4Recipe, NVFP4Precision
from lightning_bpfree.fp4 import FP4Linear
from lightning_bpfree.fp4 import precision as precision_module
from lightning_bpfree.fp4 import transformer_engine as te_module
from lightning_bpfree.fp4.bench import byte_blocks, make_task
from lightning_bpfree.fp4.convert import convert_to_fp4, matches_pattern
from lightning_bpfree.models import tiny_causal_lm

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _trainer(plugin, max_steps, tmp_path=None, **kwargs):
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, plugins=None if plugin is None else [plugin],
        default_root_dir=tmp_path,
        **kwargs,
    )  # fmt: skip


def _loader(seq_len=32, batch_size=8, limit=256, shuffle=True):
    train, _ = byte_blocks(seq_len)
    return DataLoader(TensorDataset(train[:limit]), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip


def test_convert_module_swaps_linears_in_place_and_keeps_the_head():
    model = tiny_causal_lm("llama", vocab_size=128, hidden_size=32, num_layers=3, num_heads=2)
    weights_before = {name: p for name, p in model.named_parameters()}
    plugin = NVFP4Precision(high_precision_last_n=1)
    assert plugin.convert_module(model) is model
    converted = {name for name, m in model.named_modules() if isinstance(m, FP4Linear)}
    expected = {f"model.layers.{i}.{part}.{name}" for i in (0, 1) for part, names in
                (("self_attn", LLAMA_LINEARS[:4]), ("mlp", LLAMA_LINEARS[4:])) for name in names}  # fmt: skip
    assert converted == expected
    assert plugin.report.kept["lm_head"].startswith("matches keep_high_precision")
    assert all(reason == "in the last 1 blocks" for n, reason in plugin.report.kept.items() if "layers.2" in n)
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.embed_tokens, nn.Embedding)
    assert all(p is weights_before[name] for name, p in model.named_parameters())  # same parameter objects
    first = tiny_causal_lm("llama", vocab_size=128, hidden_size=32, num_layers=3, num_heads=2)
    NVFP4Precision(high_precision_first_n=1, keep_high_precision=("*.mlp.*",)).convert_module(first)
    assert type(first.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(first.model.layers[1].self_attn.q_proj, FP4Linear)
    assert type(first.model.layers[1].mlp.up_proj) is nn.Linear


def test_tied_heads_and_incompatible_layers_stay_high_precision():
    tied = tiny_causal_lm("llama", vocab_size=128, hidden_size=32, num_layers=1, num_heads=2,
                          tie_word_embeddings=True)  # fmt: skip
    tied.lm_head.weight = tied.model.embed_tokens.weight
    report = convert_to_fp4(tied, keep_high_precision=())
    assert report.kept == {"lm_head": "output head / tied to an embedding"}
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 30))
    with pytest.warns(UserWarning, match=r"not multiples of the FP4 block size 16: 2"):
        report = convert_to_fp4(model)
    assert report.converted == ["0"] and isinstance(model[0], FP4Linear) and type(model[2]) is nn.Linear
    assert matches_pattern("model.lm_head", "lm_head") and not matches_pattern("model.lm_header", "lm_head")


def test_trainer_fits_and_loss_falls_with_fp4_layers():
    task = make_task(hidden_size=32, num_layers=2, lr=3e-3, max_steps=30, seed=0)
    plugin = NVFP4Precision()
    calls = []
    _trainer(plugin, max_steps=30).fit(task, _loader())
    for layer in task.model.modules():
        if isinstance(layer, FP4Linear):
            calls.append(layer.generator_state() is not None)  # SR generators were used in backward
    assert len(calls) == 14 and all(calls)
    assert plugin.optimizer_steps == 30
    first, last = sum(task.losses[:5]) / 5, sum(task.losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # from ~5.5 nats/byte (uniform over 256) down towards 3.5
    # the same seed, batches and schedule in fp32: FP4 must end close to it, not merely lower than it began
    reference = make_task(hidden_size=32, num_layers=2, lr=3e-3, max_steps=30, seed=0)
    _trainer(None, max_steps=30).fit(reference, _loader())
    assert reference.losses[0] == pytest.approx(task.losses[0], rel=0.02)  # same start, up to the FP4 forward
    fp32_last = sum(reference.losses[-5:]) / 5
    assert abs(last - fp32_last) < 0.02 * fp32_last, (last, fp32_last)  # measured: 3.7326 vs 3.7343


def test_checkpoint_resumes_steps_recipe_and_generators(tmp_path):
    recipe = FP4Recipe(rht=False)
    # the schedule of an 8-step run, stopped after 4 steps; one batch an epoch, so the data order cannot
    # depend on where Lightning restarts its (non-stateful) dataloader
    task = make_task(hidden_size=32, num_layers=1, lr=3e-3, max_steps=8, seed=0)
    plugin = NVFP4Precision(recipe, switch_to_high_precision_at_step=6, switch_gemms=("fprop",))
    trainer = _trainer(plugin, max_steps=4, tmp_path=tmp_path)
    trainer.fit(task, _loader(limit=8, shuffle=False))
    path = tmp_path / "fp4.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["NVFP4Precision"]
    assert state["optimizer_steps"] == 4 and state["recipe"]["rht"] is False and not state["switched"]
    assert len(state["generator_states"]) == 7
    resumed_task = make_task(hidden_size=32, num_layers=1, lr=3e-3, max_steps=8, seed=1)
    resumed = NVFP4Precision(recipe, switch_to_high_precision_at_step=6, switch_gemms=("fprop",))
    _trainer(resumed, max_steps=8, tmp_path=tmp_path).fit(resumed_task, _loader(limit=8, shuffle=False),
                                                          ckpt_path=path)  # fmt: skip
    assert resumed.optimizer_steps == 8 and resumed.switched
    layer = resumed_task.model.model.layers[0].mlp.up_proj
    assert layer.fp4_enabled and layer.recipe.quantized_gemms == ("dgrad", "wgrad")  # forward-only switch
    fresh = NVFP4Precision(recipe)
    fresh.convert_module(make_task(hidden_size=32, num_layers=1, lr=3e-3, max_steps=8, seed=1))
    fresh.load_state_dict(state)
    name = "model.model.layers.0.mlp.up_proj"
    assert torch.equal(fresh._layers[name].generator_state(), state["generator_states"][name])
    # an uninterrupted 8-step run ends on the same parameters, bit for bit: weights, optimizer state,
    # schedule, step count, the switch and the stochastic-rounding generators all resumed
    straight_task = make_task(hidden_size=32, num_layers=1, lr=3e-3, max_steps=8, seed=0)
    straight = NVFP4Precision(recipe, switch_to_high_precision_at_step=6, switch_gemms=("fprop",))
    _trainer(straight, max_steps=8, tmp_path=tmp_path / "straight").fit(straight_task, _loader(limit=8, shuffle=False))
    assert straight_task.losses[4:] == resumed_task.losses
    for (name, p), (_, q) in zip(straight_task.named_parameters(), resumed_task.named_parameters()):
        assert torch.equal(p, q), name


def test_full_switch_turns_layers_back_into_plain_linears():
    task = make_task(hidden_size=32, num_layers=1, lr=3e-3, max_steps=3, seed=0)
    plugin = FP4Precision("ue5m3", switch_to_high_precision_at_step=2)
    _trainer(plugin, max_steps=3).fit(task, _loader(limit=32))
    layers = [m for m in task.model.modules() if isinstance(m, FP4Linear)]
    assert plugin.switched and layers and not any(layer.fp4_enabled for layer in layers)
    assert all(layer.recipe.fmt == "ue5m3" for layer in layers)


def test_transformer_engine_is_selected_only_on_nvfp4_hardware(monkeypatch):
    recipe = FP4Recipe()
    monkeypatch.setattr(te_module, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (10, 0))
    assert precision_module.select_backend("auto", recipe) == "transformer_engine"
    assert precision_module.select_backend("auto", FP4Recipe.mxfp4()) == "emulate"
    assert precision_module.select_backend("emulate", recipe) == "emulate"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    assert precision_module.select_backend("auto", recipe) == "emulate"
    with pytest.raises(RuntimeError, match="compute capability"):
        precision_module.select_backend("transformer_engine", recipe)


def test_transformer_engine_backend_swaps_in_te_layers(monkeypatch):
    created = {}

    class FakeTELinear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)

    class FakeRecipe:
        def __init__(self, **kwargs):
            created.update(kwargs)

    te_pytorch = types.SimpleNamespace(Linear=FakeTELinear, autocast=lambda enabled, recipe: ("autocast", recipe))
    te_recipe = types.SimpleNamespace(NVFP4BlockScaling=FakeRecipe)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te_pytorch)
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", te_recipe)
    monkeypatch.setattr(te_module, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (10, 3))
    plugin = NVFP4Precision(FP4Recipe(stochastic_rounding=False))
    assert plugin.backend == "transformer_engine"
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    original = model[0].weight.detach().clone()
    plugin.convert_module(model)
    assert isinstance(model[0], FakeTELinear) and torch.equal(model[0].weight, original)
    assert created == {"disable_rht": False, "disable_stochastic_rounding": True, "disable_2d_quantization": False}
    assert plugin.forward_context()[0] == "autocast"


def test_bad_plugin_arguments_raise():
    with pytest.raises(ValueError, match="all-NVFP4"):
        NVFP4Precision(FP4Recipe.mxfp4())
    with pytest.raises(TypeError, match="recipe must be"):
        FP4Precision(recipe=3)
    with pytest.raises(ValueError, match="recipe must be one of"):
        FP4Precision("fp4")
    with pytest.raises(ValueError, match="switch_to_high_precision_at_step"):
        NVFP4Precision(switch_to_high_precision_at_step=-1)
    with pytest.raises(ValueError, match="switch_gemms"):
        NVFP4Precision(switch_gemms=("backward",))
    with pytest.raises(ValueError, match="backend"):
        NVFP4Precision(backend="cuda")
    with pytest.raises(ValueError, match="high_precision_last_n"):
        NVFP4Precision(high_precision_last_n=-2)
    with pytest.raises(ValueError, match="nn.ModuleList"):
        NVFP4Precision(high_precision_last_n=1).convert_module(nn.Sequential(nn.Linear(16, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert NVFP4Precision().precision == "32-true"  # master weights and everything else stay fp32
