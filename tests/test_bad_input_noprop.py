"""Bad input to NoProp (NoPropDT / CT / FM, BackpropBaseline): errors that name the argument, and
non-finite images refused with a ValueError naming ``images``."""

import pytest
import torch

from lightning_bpfree.noprop import BackpropBaseline, NoPropCT, NoPropDT, NoPropFM

NAN, INF = float("nan"), float("inf")
SHAPE = (1, 8, 8)
SMALL = {"hidden": 8, "channels": (4,)}


@pytest.mark.parametrize("cls", [NoPropDT, NoPropCT, NoPropFM, BackpropBaseline])
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"lr": INF}, ValueError, "lr"),
        ({"lr": NAN}, ValueError, "lr"),
        ({"lr": -1e-3}, ValueError, "lr"),
        ({"lr": 0}, ValueError, "lr"),
        ({"lr": "1e-3"}, TypeError, "lr"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"weight_decay": INF}, ValueError, "weight_decay"),
        ({"hidden": 0}, ValueError, "hidden"),
        ({"hidden": 8.0}, TypeError, "hidden"),
        ({"channels": (4, -1)}, ValueError, r"channels\[1\]"),
        ({"channels": 4}, TypeError, "channels"),
        ({"image_shape": (8, 8)}, ValueError, "image_shape"),
        ({"image_shape": (1, 0, 8)}, ValueError, "image_shape"),
        ({"image_shape": "1x8x8"}, ValueError, "image_shape"),
    ],
)
def test_every_variant_rejects_bad_shared_arguments(cls, kwargs, error, message):
    arguments = {"num_classes": 3, "image_shape": SHAPE, **SMALL, **kwargs}
    with pytest.raises(error, match=message):
        cls(**arguments)


@pytest.mark.parametrize(
    "cls, kwargs, error, message",
    [
        (NoPropDT, {"eta": INF}, ValueError, "eta"),
        (NoPropDT, {"eta": 0.0}, ValueError, "eta"),
        (NoPropDT, {"num_blocks": 0}, ValueError, "num_blocks"),
        (NoPropDT, {"max_alpha_bar": 1.0}, ValueError, "max_alpha_bar"),
        (NoPropDT, {"inference_samples": 0}, ValueError, "inference_samples"),
        (NoPropDT, {"inference_noise": "false"}, TypeError, "inference_noise"),
        (NoPropDT, {"embedding": "random"}, ValueError, "embedding"),
        (NoPropDT, {"embedding_dim": 0}, ValueError, "embedding_dim"),
        (NoPropDT, {"train_embedding": "yes"}, TypeError, "train_embedding"),
        (NoPropDT, {"embedding": "prototype", "prototypes": torch.full((3, 64), NAN)}, ValueError, "prototypes"),
        (NoPropDT, {"num_classes": 1}, ValueError, "num_classes"),
        (NoPropDT, {"num_classes": 2.0}, TypeError, "num_classes"),
        (NoPropCT, {"eta": INF}, ValueError, "eta"),
        (NoPropCT, {"eta": -1.0}, ValueError, "eta"),
        (NoPropCT, {"gamma_min": -INF}, ValueError, "gamma_min"),
        (NoPropCT, {"gamma_max": NAN}, ValueError, "gamma_max"),
        (NoPropCT, {"gamma_min": 4.0, "gamma_max": -4.0}, ValueError, "gamma_min"),
        (NoPropCT, {"solver": "rk4"}, ValueError, "solver"),
        (NoPropCT, {"inference_steps": 0}, ValueError, "inference_steps"),
        (NoPropFM, {"ce_weight": NAN}, ValueError, "ce_weight"),
        (NoPropFM, {"ce_weight": INF}, ValueError, "ce_weight"),
        (NoPropFM, {"ce_weight": -1.0}, ValueError, "ce_weight"),
        (NoPropFM, {"inference_steps": -2}, ValueError, "inference_steps"),
        (NoPropFM, {"eta": 0.1}, TypeError, "eta"),  # an option FM does not have
    ],
)
def test_variant_options_are_checked(cls, kwargs, error, message):
    arguments = {"num_classes": 3, "image_shape": SHAPE, **SMALL, **kwargs}
    with pytest.raises(error, match=message):
        cls(**arguments)


def _batch(n=4):
    return torch.rand(n, *SHAPE), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("cls", [NoPropDT, NoPropCT, NoPropFM, BackpropBaseline])
@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.full((4, *SHAPE), NAN), ValueError, "images holds NaN or inf"),
        (torch.full((4, *SHAPE), INF), ValueError, "images holds NaN or inf"),
        (torch.zeros(4, *SHAPE, dtype=torch.uint8), TypeError, "images must be a floating-point"),
        (torch.rand(4, 3, 8, 8), ValueError, "images must have shape"),
        (torch.rand(0, *SHAPE), ValueError, "images must have shape"),
        (torch.rand(()), ValueError, "images must have shape"),
        ([[0.0]], TypeError, "images"),
    ],
    ids=["nan", "inf", "uint8", "channels", "empty", "0-d", "list"],
)
def test_non_finite_and_malformed_images_are_refused_in_inference(cls, images, error, message):
    model = cls(3, SHAPE, **SMALL)
    with pytest.raises(error, match=message):
        model(images)


@pytest.mark.parametrize("cls", [NoPropCT, NoPropFM])
def test_a_nan_image_in_training_is_refused_before_any_weight_moves(cls):
    model = cls(3, SHAPE, **SMALL)
    images, labels = _batch()
    images[1, 0, 2, 2] = NAN
    with pytest.raises(ValueError, match="images holds NaN"):
        model.net.loss(images, labels)


def test_a_nan_image_reaches_no_noprop_dt_block():
    model = NoPropDT(3, SHAPE, num_blocks=2, **SMALL)
    images, labels = _batch()
    images[0, 0, 0, 0] = NAN
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="images holds NaN"):
        model.net.block_loss(0, images, labels)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0, 1, 2, 3]), "labels must lie"),
        (torch.zeros(4), "labels must be int64"),
        (torch.zeros(3, dtype=torch.long), "labels"),
    ],
)
def test_bad_labels_are_refused(labels, message):
    model = NoPropFM(3, SHAPE, **SMALL)
    with pytest.raises(ValueError, match=message):
        model.net.loss(torch.rand(4, *SHAPE), labels)
