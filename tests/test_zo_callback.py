import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree import ZerothOrder


def regression_data(n: int = 256, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    y = (x @ torch.randn(8, 1, generator=generator)).squeeze(-1)
    return TensorDataset(x, y)


class Regressor(pl.LightningModule):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())  # replaced by ZerothOrder


def make_trainer(tmp_path, callbacks, **kwargs):
    options = dict(
        max_steps=20, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def loader(batch_size=32, shuffle=False):
    return DataLoader(regression_data(), batch_size=batch_size, shuffle=shuffle)


def test_trains_unmodified_module_forward_only(tmp_path):
    torch.manual_seed(0)
    module = Regressor(dropout=0.5)
    trainer = make_trainer(tmp_path, [ZerothOrder(lr=0.005, eps=1e-3, seed=0)], max_steps=120)
    with torch.no_grad():
        x, y = regression_data().tensors
        start = nn.functional.mse_loss(module.eval().net(x).squeeze(-1), y).item()
    module.train()
    trainer.fit(module, loader())
    assert trainer.global_step == 120
    assert all(p.grad is None for p in module.parameters())
    with torch.no_grad():
        end = nn.functional.mse_loss(module.eval().net(x).squeeze(-1), y).item()
    assert end < 0.6 * start
    for key in ("zo/loss", "zo/loss_plus", "zo/loss_minus", "zo/projected_grad", "zo/skipped_steps"):
        assert key in trainer.callback_metrics
    # the module gets its own methods back
    assert "training_step" not in module.__dict__ and "configure_optimizers" not in module.__dict__


def test_dropout_is_off_during_perturbed_forwards(tmp_path):
    seen_training_flags = []

    class Spy(Regressor):
        def training_step(self, batch, batch_idx):
            seen_training_flags.append(self.net[2].training)
            return super().training_step(batch, batch_idx)

    module = Spy(dropout=0.5)
    make_trainer(tmp_path, [ZerothOrder(lr=1e-3)], max_steps=3).fit(module, loader())
    assert seen_training_flags == [False] * 6
    assert module.net[2].training  # restored after each step


def test_non_differentiable_objective_is_optimized(tmp_path):
    # maximise accuracy: the loss is minus the fraction of correct labels (piecewise constant)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, 2, generator=generator)
    labels = (x[:, 0] + 0.5 * x[:, 1] > 0).long()

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return -(self.linear(inputs).argmax(-1) == targets).float().mean()

        def configure_optimizers(self):
            return None

    module = Classifier()
    accuracy = lambda: (module.linear(x).argmax(-1) == labels).float().mean().item()  # noqa: E731
    with torch.no_grad():
        start = accuracy()
    data = DataLoader(TensorDataset(x, labels), batch_size=512)
    make_trainer(tmp_path, [ZerothOrder(lr=0.5, eps=0.2, seed=3)], max_steps=150).fit(module, data)
    with torch.no_grad():
        end = accuracy()
    assert start < 0.2 and end > 0.85


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    # One full batch per epoch, so every step sees the same data whatever Lightning's dataloader
    # restart does: only the restored ZO state can make the runs differ.
    def fit(max_steps, ckpt_path=None, save_to=None):
        torch.manual_seed(0)
        module = Regressor()
        trainer = make_trainer(tmp_path, [ZerothOrder(lr=0.01, seed=4)], max_steps=max_steps)
        trainer.fit(module, loader(batch_size=256), ckpt_path=ckpt_path)
        if save_to is not None:
            trainer.save_checkpoint(save_to)
        return module, trainer

    uninterrupted, _ = fit(12)
    interrupted, _ = fit(5, save_to=tmp_path / "mid.ckpt")
    resumed, trainer = fit(12, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert trainer.global_step == 12 and trainer.optimizers[0].zo_state["step"] == 12
    assert any(not torch.equal(a, b) for a, b in zip(uninterrupted.parameters(), interrupted.parameters()))
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "16-true"])
def test_reduced_precisions_train(tmp_path, precision):
    torch.manual_seed(0)
    module = Regressor()
    before = [p.detach().float().clone() for p in module.parameters()]
    trainer = make_trainer(tmp_path, [ZerothOrder(lr=0.01, eps=1e-2)], max_steps=4, precision=precision)
    trainer.fit(module, loader())
    assert trainer.global_step == 4
    assert any(not torch.equal(a, b.detach().float()) for a, b in zip(before, module.parameters()))


def test_grad_scaler_precision_is_refused_with_a_reason(tmp_path):
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = make_trainer(tmp_path, [ZerothOrder(lr=1e-3)], plugins=[plugin])
    with pytest.raises(ValueError, match="GradScaler.*bf16"):
        trainer.fit(Regressor(), loader())


def test_lr_scheduler_is_stepped_every_batch(tmp_path):
    module = Regressor()
    schedule = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    trainer = make_trainer(tmp_path, [ZerothOrder(lr=1e-2, scheduler=schedule)], max_steps=3)
    trainer.fit(module, loader())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 / 8)


def test_bad_options_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ZerothOrder(optimizer="zo-magic")
    with pytest.raises(ValueError, match="eps"):
        ZerothOrder(eps=0)
    with pytest.raises(ValueError, match="lr"):
        ZerothOrder(lr=-1)


def test_accumulation_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [ZerothOrder(lr=1e-3)], accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer.fit(Regressor(), loader())


def test_peft_lora_trains_only_the_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lightning_bpfree.models import tiny_causal_lm

    base = tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return None

    ids = torch.randint(3, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    make_trainer(tmp_path, [ZerothOrder(lr=1e-2, eps=1e-2)], max_steps=3).fit(LM(), DataLoader(TensorDataset(ids), batch_size=8))
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_smollm2_zo_step_offline(tmp_path):
    from lightning_bpfree.models import load_smollm2

    model, tokenizer = load_smollm2()
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt")["input_ids"][:, :32]

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return None

    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss.item() < 6.0  # a real pretrained LM, not random
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = make_trainer(tmp_path, [ZerothOrder(lr=1e-6, eps=1e-3)], max_steps=1)
    trainer.fit(LM(), DataLoader(TensorDataset(ids), batch_size=1))
    assert trainer.global_step == 1
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
    assert all(p.grad is None for p in model.parameters())


def test_module_is_given_back_as_it_came_and_an_ordinary_fit_then_trains(tmp_path):
    module = Regressor()
    trainer = make_trainer(tmp_path, [ZerothOrder(lr=1e-3, seed=0)], max_steps=3)
    trainer.fit(module, loader())
    assert trainer.global_step == 3  # the finished trainer still reports the ZO steps
    assert module.automatic_optimization is True
    assert not {"training_step", "configure_optimizers", "_bpfree_zeroth_order"} & set(module.__dict__)
    before = [p.detach().clone() for p in module.parameters()]
    # max_epochs guards against the old failure (global_step stuck at 0 runs empty epochs forever)
    ordinary = make_trainer(tmp_path, [], max_steps=5, max_epochs=2)
    ordinary.fit(module, loader())
    assert ordinary.global_step == 5
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))  # Adam trained it


def test_module_is_given_back_after_a_failed_fit(tmp_path):
    class NoLoss(Regressor):
        def training_step(self, batch, batch_idx):
            return None

    module = NoLoss()
    with pytest.raises(ValueError, match="must return the loss"):
        make_trainer(tmp_path, [ZerothOrder(lr=1e-3)], max_steps=2).fit(module, loader())
    assert module.automatic_optimization is True
    assert "training_step" not in module.__dict__ and "configure_optimizers" not in module.__dict__


def test_a_module_with_no_trainable_parameter_is_refused(tmp_path):
    module = Regressor().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter to train.*requires_grad"):
        make_trainer(tmp_path, [ZerothOrder(lr=1e-3)], max_steps=2).fit(module, loader())
    assert module.automatic_optimization is True and "training_step" not in module.__dict__


def test_unknown_or_inapplicable_options_are_refused_at_construction():
    with pytest.raises(TypeError, match=r"ZerothOrder\('zo-sgd'\).*'momentum'.*valid options:.*num_queries"):
        ZerothOrder("zo-sgd", momentum=0.9)
    with pytest.raises(TypeError, match="'num_querys'.*valid options"):
        ZerothOrder(num_querys=4)
    ZerothOrder("zo-sgd-mmt", momentum=0.5)  # where it applies, it is accepted
    with pytest.raises(TypeError, match="seed"):  # values too, before any Trainer exists
        ZerothOrder(seed="abc")
    with pytest.raises(TypeError, match="disable_dropout"):
        ZerothOrder(disable_dropout="false")


def test_other_multi_process_strategies_are_refused_at_setup(tmp_path):
    from unittest import mock

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = make_trainer(tmp_path, [ZerothOrder(lr=1e-3)])
    callback = trainer.callbacks[0]
    with mock.patch.object(pl.Trainer, "world_size", 2), mock.patch.object(pl.Trainer, "strategy", FSDPStrategy()):
        with pytest.raises(ValueError, match="FSDPStrategy.*strategy='ddp'"):
            callback._needs_data_parallel(trainer)


def test_resume_at_an_epoch_boundary_is_bitwise_identical_with_several_batches_per_epoch(tmp_path):
    # 4 batches per epoch; ModelCheckpoint(every_n_train_steps=4) writes after the last batch of each
    # epoch, and the data order of an epoch does not depend on the run's history (shuffle=False).
    # docs/zo.md states the limits: a mid-epoch checkpoint restarts the epoch's data at its first
    # batch, and Lightning replays one batch after an every_n_epochs / end-of-fit checkpoint.
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps, ckpt_path=None, folder=None):
        torch.manual_seed(0)
        module = Regressor()
        callbacks = [ZerothOrder("zo-adam", lr=0.01, seed=4)]
        if folder is not None:
            callbacks.append(ModelCheckpoint(dirpath=folder, every_n_train_steps=4, save_top_k=-1, filename="{step}"))
        trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=folder is not None)
        trainer.fit(module, loader(batch_size=64), ckpt_path=ckpt_path)
        return module, trainer

    uninterrupted, _ = fit(12)
    fit(12, folder=tmp_path / "ckpt")
    resumed, trainer = fit(12, ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert trainer.global_step == 12 and trainer.optimizers[0].zo_state["step"] == 12
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


class NormRegressor(Regressor):
    """The regressor with a LayerNorm: weights, biases and norm weights to tell apart."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 1))


@pytest.mark.parametrize("no_decay", ["default", None])
def test_weight_decay_spares_biases_and_norm_weights_by_default(tmp_path, no_decay):
    """One step written out: theta - lr (g z + wd theta) for decayed tensors, theta - lr g z for the others
    (MeZO's zo_update), with g the optimizer's recorded projected gradient and z regenerated from its seed."""
    from lightning_bpfree.zo import SeededNoise, mix_seed

    torch.manual_seed(0)
    module = NormRegressor()
    named = dict(module.named_parameters())
    before = {name: p.detach().clone() for name, p in named.items()}
    lr, wd, seed = 0.1, 0.5, 11  # lr * wd = 5 %: the decay dominates the ZO step of a bias or a norm weight
    options = {} if no_decay == "default" else {"no_decay": no_decay}
    trainer = make_trainer(tmp_path, [ZerothOrder(lr=lr, eps=1e-3, weight_decay=wd, seed=seed, **options)], max_steps=1)
    trainer.fit(module, loader())
    optimizer = trainer.optimizers[0]
    exempt = {"net.0.bias", "net.1.weight", "net.1.bias", "net.3.bias"} if no_decay == "default" else set()
    # the optimizer numbers parameters in group order (decayed first) and draws each one's noise from that index
    order = [n for n in named if n not in exempt] + [n for n in named if n in exempt]
    (g,) = optimizer.last_estimate.projected_grads
    assert abs(g) > 0
    for index, name in enumerate(order):
        z = SeededNoise().noise_like(before[name], mix_seed(seed, 0, 0), index)
        decay = 0.0 if name in exempt else wd
        expected = before[name] - lr * (g * z + decay * before[name])
        torch.testing.assert_close(named[name].detach(), expected, rtol=1e-6, atol=1e-6)
        # the other rule would be off by lr * wd * theta (5 % of the norm weights, which start at 1;
        # nothing for the LayerNorm bias, which starts at 0)
        if name != "net.1.bias":
            wrong = before[name] - lr * (g * z + (wd - decay) * before[name])
            assert (named[name].detach() - wrong).abs().max() > 1e-3
    assert [g["weight_decay"] for g in optimizer.param_groups] == ([wd, 0.0] if exempt else [wd])


def test_no_decay_must_be_none_the_default_or_a_callable():
    for bad in ("bias", 1, ["bias"]):
        with pytest.raises(TypeError, match="no_decay"):
            ZerothOrder(weight_decay=0.1, no_decay=bad)
    ZerothOrder(weight_decay=0.1, no_decay=lambda name, p: name.endswith("bias"))
