"""AdjointDPM on real images: steer a tiny DDPM trained on scikit-learn's 8x8 digits.

1. Train a small ``UNet2DModel`` as a DDPM on the digits with Lightning (most of the run time).
2. Train a small CNN classifier on the same digits.
3. (a) ``target="noise"``: optimize ``x_T`` so the samples are classified as ``--noise-class``.
   (b) ``target="weights"``: fine-tune the UNet's up-sampling path so samples from fresh noise raise the
       classifier's log-probability of ``--weights-class``.
Gradients come from the adjoint ODE through 20 DDIM (Euler) steps. Before/after sample grids are written
as PNG and the figures as JSON into ``--out``; the time of each phase is printed at the end.

    python examples/diffusion_digits.py --out bpfree-results/diffusion-digits   # about 9 min on one CPU core
    python examples/diffusion_digits.py --quick    # 30 DDPM steps, 5 sampling steps, 5 + 3 adjoint steps: about 23 s

``--unet-cache unet.pt`` saves the trained DDPM and skips its training on the next run (whatever that
run's ``--ddpm-steps``: do not share one cache between ``--quick`` and full runs).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_bpfree.benchmarking import new_figure, save_figure  # noqa: E402
from lightning_bpfree.data import digits  # noqa: E402
from lightning_bpfree.diffusion import AdjointDPMCustomization  # noqa: E402

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


class DenoiserTraining(pl.LightningModule):
    """Standard DDPM training: predict the noise added at a random timestep (MSE)."""

    def __init__(self, unet: UNet2DModel, lr: float = 2e-3, max_steps: int = 1500) -> None:
        super().__init__()
        self.unet = unet
        self.noise_schedule = DDPMScheduler(**SCHEDULE)
        self.lr = lr
        self.max_steps = max_steps

    def training_step(self, batch, batch_idx):
        (images,) = batch
        noise = torch.randn_like(images)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (images.shape[0],))
        noisy = self.noise_schedule.add_noise(images, noise, t)
        loss = F.mse_loss(self.unet(noisy, t).sample, noise)
        self.log("denoising_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=self.max_steps)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


def make_classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )


def train_classifier(images, labels, steps: int = 400) -> tuple[nn.Module, float]:
    """A CNN on 1,500 digits (in [-1, 1]); returns it and its accuracy on the other 297."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    train, test = order[:1500], order[1500:]
    model = make_classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (64,))]
        # light noise augmentation keeps the classifier's gradients informative off the data manifold
        inputs = images[batch] + 0.1 * torch.randn_like(images[batch])
        loss = F.cross_entropy(model(inputs), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = float((model(images[test]).argmax(1) == labels[test]).float().mean())
    return model, accuracy


class ClassLoss(nn.Module):
    """Per sample, ``-log p(class | x_0)`` or, with ``bounded=True``, ``1 - p(class | x_0)``.

    The bounded form stops pushing once a sample is confidently in the class, which slows the drift of a
    fine-tuned model towards images that only fool the classifier (reward hacking).
    """

    def __init__(self, classifier: nn.Module, target_class: int, bounded: bool = False) -> None:
        super().__init__()
        self.classifier = classifier
        self.target_class = target_class
        self.bounded = bounded

    def forward(self, x_0: torch.Tensor) -> torch.Tensor:
        log_probs = self.classifier(x_0).log_softmax(dim=1)[:, self.target_class]
        return 1.0 - log_probs.exp() if self.bounded else -log_probs


def class_fraction(classifier: nn.Module, samples: torch.Tensor, target_class: int) -> float:
    with torch.no_grad():
        return float((classifier(samples).argmax(1) == target_class).float().mean())


def grid_figure(before: torch.Tensor, after: torch.Tensor, titles: tuple[str, str], path: Path) -> Path:
    fig, axes = new_figure(ncols=2, width=3.6, height=3.9)
    for axis, samples, title in zip(axes, (before, after), titles):
        count = min(16, samples.shape[0])
        tiles = samples[:count, 0].clamp(-1, 1).view(4, 4, 8, 8).permute(0, 2, 1, 3).reshape(32, 32)
        axis.imshow(tiles.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    return save_figure(fig, path)


def trainer(max_steps: int, out: Path, progress: bool = True) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        default_root_dir=out,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bpfree-results") / "diffusion-digits")
    parser.add_argument("--ddpm-steps", type=int, default=None, help="DDPM steps, batch 128 (1500, quick 30)")
    parser.add_argument("--sampling-steps", type=int, default=None, help="DDIM / Euler sampler steps (20, quick 5)")
    parser.add_argument("--noise-class", type=int, default=3)
    parser.add_argument("--weights-class", type=int, default=7)
    parser.add_argument("--noise-steps", type=int, default=None, help="optimizer steps on x_T (40, quick 5)")
    parser.add_argument("--weights-steps", type=int, default=None, help="optimizer steps on UNet weights (40, quick 3)")
    parser.add_argument("--weights-lr", type=float, default=1e-4)
    parser.add_argument("--unet-cache", type=Path, default=None, help="reuse / save the trained DDPM weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny step counts, same code path (CI)")
    args = parser.parse_args(argv)
    quick = {"ddpm_steps": 30, "sampling_steps": 5, "noise_steps": 5, "weights_steps": 3}
    full = {"ddpm_steps": 1500, "sampling_steps": 20, "noise_steps": 40, "weights_steps": 40}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    classifier_steps = 100 if args.quick else 400
    seconds: dict[str, tuple[float, float]] = {}  # phase: (wall, CPU of this process)
    clock = (time.perf_counter(), time.process_time())

    def lap(phase: str) -> None:
        nonlocal clock
        now = (time.perf_counter(), time.process_time())
        seconds[phase], clock = (now[0] - clock[0], now[1] - clock[1]), now
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed)

    images, labels = digits()
    images = images * 2.0 - 1.0  # [1797, 1, 8, 8] in [-1, 1]

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    if args.unet_cache is not None and args.unet_cache.exists():
        unet.load_state_dict(torch.load(args.unet_cache))
    else:
        loader = DataLoader(TensorDataset(images), batch_size=128, shuffle=True, drop_last=True)
        trainer(args.ddpm_steps, args.out).fit(DenoiserTraining(unet, max_steps=args.ddpm_steps), loader)
        if args.unet_cache is not None:
            torch.save(unet.state_dict(), args.unet_cache)
    unet.eval()
    lap("ddpm")

    classifier, accuracy = train_classifier(images, labels, steps=classifier_steps)
    lap("classifier")
    print(f"classifier accuracy on 297 held-out digits: {accuracy:.3f}")
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False)
    results: dict[str, float | int] = {"classifier_accuracy": accuracy, "sampling_steps": args.sampling_steps}

    # (a) optimize the noise
    noise_goal = ClassLoss(classifier, args.noise_class)
    audit = AdjointDPMCustomization(
        unet, scheduler, noise_goal, "noise", num_steps=args.sampling_steps, lr=0.05, batch_size=16
    )
    before = audit.generate()
    trainer(args.noise_steps, args.out).fit(audit)
    after = audit.generate()
    results |= {
        "noise_class": args.noise_class,
        "noise_fraction_before": class_fraction(classifier, before, args.noise_class),
        "noise_fraction_after": class_fraction(classifier, after, args.noise_class),
        "noise_loss_before": float(noise_goal(before).mean()),
        "noise_loss_after": float(noise_goal(after).mean()),
        "noise_rms_after": float(audit.noise.detach().pow(2).mean().sqrt()),
    }
    grid_figure(
        before,
        after,
        ("samples from x_T", f"x_T optimized towards '{args.noise_class}'"),
        args.out / "noise_before_after.png",
    )
    lap("noise")

    # (b) fine-tune the weights; held-out noise measures generalization to new samples
    held_out = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(12345))
    weights_goal = ClassLoss(classifier, args.weights_class, bounded=True)
    tuning = AdjointDPMCustomization(
        unet,
        scheduler,
        weights_goal,
        "weights",
        num_steps=args.sampling_steps,
        lr=args.weights_lr,
        batch_size=16,
        parameter_filter="up_blocks|conv_out",
        seed=args.seed,
    )
    before = tuning.generate(held_out)
    trainer(args.weights_steps, args.out).fit(tuning)
    after = tuning.generate(held_out)
    results |= {
        "weights_class": args.weights_class,
        "weights_fraction_before": class_fraction(classifier, before, args.weights_class),
        "weights_fraction_after": class_fraction(classifier, after, args.weights_class),
        "weights_loss_before": float(weights_goal(before).mean()),
        "weights_loss_after": float(weights_goal(after).mean()),
        "trained_parameters": sum(p.numel() for p in tuning.trainable_parameters()),
    }
    grid_figure(
        before,
        after,
        ("held-out noise, DDPM", f"after fine-tuning towards '{args.weights_class}'"),
        args.out / "weights_before_after.png",
    )
    lap("weights")
    (args.out / "diffusion_digits.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("seconds per phase (wall / CPU):", ", ".join(f"{k} {w:.0f} / {c:.0f}" for k, (w, c) in seconds.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
