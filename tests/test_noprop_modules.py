"""NoProp networks and LightningModules: block isolation, learning on sklearn digits, layouts, bad input."""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.data import digits
from lightning_bpfree.noprop import (
    NoPropCT,
    NoPropDT,
    NoPropDTNet,
    NoPropFM,
    NoPropFMNet,
    class_prototypes,
    noprop_dt_step,
)

SMALL = dict(hidden=32, channels=(8, 16))


def _batch(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _block_parameters(net, block):
    return list(net.blocks[block].parameters())


def test_block_loss_reaches_only_its_own_block():
    net = NoPropDTNet(10, (1, 8, 8), num_blocks=3, **SMALL)
    images, labels = _batch()
    for block in range(3):
        loss = net.block_loss(block, images, labels)
        everything = [p for b in range(3) for p in _block_parameters(net, b)]
        grads = torch.autograd.grad(loss, everything + [net.embedding.weight], allow_unused=True)
        per_block = [grads[sum(len(_block_parameters(net, b)) for b in range(k)) :][: len(_block_parameters(net, k))]
                     for k in range(3)]  # fmt: skip
        for other in range(3):
            if other == block:
                assert all(g is not None and g.abs().sum() > 0 for g in per_block[other])
            else:
                assert all(g is None for g in per_block[other])
        assert grads[-1] is not None  # the shared class embeddings are trained by every block
        # Changing another block's weights leaves this block's loss (same noise) exactly unchanged.
        torch.manual_seed(7)
        before = net.block_loss(block, images, labels)
        other = (block + 1) % 3
        with torch.no_grad():
            for p in _block_parameters(net, other):
                p.add_(torch.randn_like(p))
        torch.manual_seed(7)
        assert net.block_loss(block, images, labels).item() == before.item()


def test_training_step_moves_each_block_by_its_own_gradient_only():
    torch.manual_seed(0)
    net = NoPropDTNet(10, (1, 8, 8), num_blocks=3, **SMALL)
    reference = copy.deepcopy(net)
    lr = 0.5
    block_optimizers = [torch.optim.SGD(block.parameters(), lr=lr) for block in net.blocks]
    head_optimizer = torch.optim.SGD(net.head_parameters(), lr=lr)
    images, labels = _batch()

    torch.manual_seed(123)
    noprop_dt_step(net, block_optimizers, head_optimizer, images, labels)

    # Replay the same noise draws on the untouched copy, one loss at a time.
    torch.manual_seed(123)
    embedding_grad = torch.zeros_like(reference.embedding.weight)
    for block in range(3):
        loss = reference.block_loss(block, images, labels)
        params = _block_parameters(reference, block)
        grads = torch.autograd.grad(loss, params + [reference.embedding.weight])
        for before, after, grad in zip(params, _block_parameters(net, block), grads[:-1]):
            torch.testing.assert_close(after, before - lr * grad)
        embedding_grad += grads[-1]
    head_params = list(reference.output_layer.parameters()) + [reference.embedding.weight]
    head_grads = torch.autograd.grad(reference.head_loss(labels), head_params)
    for before, after, grad in zip(reference.output_layer.parameters(), net.output_layer.parameters(), head_grads):
        torch.testing.assert_close(after, before - lr * grad)
    torch.testing.assert_close(
        net.embedding.weight, reference.embedding.weight - lr * (embedding_grad + head_grads[-1])
    )


def _digits_loaders(batch_size=64):
    images, labels = digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    train = TensorDataset(images[:1400], labels[:1400])
    held_out = TensorDataset(images[1400:], labels[1400:])
    return DataLoader(train, batch_size=batch_size), DataLoader(held_out, batch_size=512)


def _fit(model, epochs):
    train, held_out = _digits_loaders()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train, held_out)
    return trainer


def test_noprop_dt_learns_digits_with_one_counted_step_per_batch():
    model = NoPropDT(10, (1, 8, 8), num_blocks=3, lr=3e-3, **SMALL)
    trainer = _fit(model, epochs=8)
    # 1400 / 64 -> 22 batches per epoch; only the head optimizer's step advances global_step.
    assert trainer.global_step == 8 * 22
    accuracy = trainer.callback_metrics["val_acc"].item()
    assert accuracy > 0.6, accuracy  # chance is 0.1
    images, _ = next(iter(_digits_loaders()[1]))
    assert model(images).shape == (images.shape[0], 10)


@pytest.mark.parametrize("cls", [NoPropCT, NoPropFM])
def test_continuous_variants_learn_digits_above_chance(cls):
    trainer = _fit(cls(10, (1, 8, 8), lr=3e-3, **SMALL), epochs=8)
    accuracy = trainer.callback_metrics["val_acc"].item()
    assert accuracy > 0.2, accuracy  # chance is 0.1; CT and FM learn slower than DT (see docs)


def test_learned_embedding_is_orthogonal_at_init_and_one_hot_is_fixed():
    learned = NoPropDTNet(10, (1, 8, 8), num_blocks=2, embedding="learned", embedding_dim=16, **SMALL)
    weight = learned.embedding.weight
    torch.testing.assert_close(weight @ weight.T, torch.eye(10), atol=1e-5, rtol=0)
    one_hot = NoPropDTNet(10, (1, 8, 8), num_blocks=2, embedding="one-hot", **SMALL)
    assert not one_hot.embedding.weight.requires_grad
    assert torch.equal(one_hot.embedding.weight, torch.eye(10))
    assert all(p is not one_hot.embedding.weight for p in one_hot.head_parameters())


def test_prototype_embedding_uses_the_image_layout():
    images, labels = digits()
    prototypes = class_prototypes(images, labels, 10)
    assert prototypes.shape == (10, 64)
    torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(10))
    mean_of_zeros = images[labels == 0].mean(0).flatten()
    torch.testing.assert_close(prototypes[0], mean_of_zeros / mean_of_zeros.norm())
    net = NoPropDTNet(10, (1, 8, 8), num_blocks=2, embedding="prototype", prototypes=prototypes, **SMALL)
    assert net.label_as_image and net.embedding_dim == 64
    assert net.blocks[0].encoder.features[0].in_channels == 2  # image and noisy label stacked
    batch, _ = _batch(5)
    assert net(batch).shape == (5, 10)
    fm = NoPropFMNet(10, (1, 8, 8), embedding="learned", embedding_dim=64, ce_weight=0.0, **SMALL)
    assert fm.label_as_image and fm(batch).shape == (5, 10)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(embedding="random"), ValueError, "one-hot"),
        (dict(embedding="one-hot", embedding_dim=12), ValueError, "embedding_dim"),
        (dict(embedding="prototype"), ValueError, "prototypes"),
        (dict(image_shape=(8, 8)), ValueError, "image_shape"),
        (dict(num_blocks=0), ValueError, "num_blocks"),
        (dict(lr=-1.0), ValueError, "lr"),
    ],
)
def test_noprop_dt_rejects_bad_configuration(kwargs, error, message):
    arguments = dict(num_classes=10, image_shape=(1, 8, 8), **SMALL)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        NoPropDT(**arguments)


def test_bad_batches_and_solvers_raise_clearly():
    model = NoPropDT(10, (1, 8, 8), num_blocks=2, **SMALL)
    with pytest.raises(ValueError, match=r"images must have shape \[B, 1, 8, 8\]"):
        model(torch.rand(4, 1, 28, 28))
    with pytest.raises(ValueError, match="labels must lie"):
        model.net.block_loss(0, torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="solver"):
        NoPropCT(10, (1, 8, 8), solver="rk4", **SMALL)
    with pytest.raises(ValueError, match="inference_steps"):
        NoPropFM(10, (1, 8, 8), inference_steps=0, **SMALL)


def test_dt_inference_samples_average_the_class_probabilities_of_independent_chains():
    from lightning_bpfree.noprop import NoPropDTNet

    net = NoPropDTNet(4, (1, 6, 6), num_blocks=3, hidden=8, channels=(2, 4)).eval()
    images = torch.rand(5, 1, 6, 6)
    torch.manual_seed(7)
    single = [net(images) for _ in range(3)]  # one chain each: the plain logits
    torch.manual_seed(7)
    assert torch.equal(net.output_layer(net.sample(images)), single[0])
    net.inference_samples = 3
    torch.manual_seed(7)
    averaged = net(images)
    expected = (sum(logits.softmax(-1) for logits in single) / 3).log()
    torch.testing.assert_close(averaged, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(averaged, single[0].log_softmax(-1))  # the chains really differ
    with pytest.raises(ValueError, match="inference_samples"):
        NoPropDTNet(4, (1, 6, 6), inference_samples=0)
