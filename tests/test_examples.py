"""Every script in examples/ runs with ``--quick`` and prints a result that could have come out wrong.

The slow test is parametrized over the folder listing, so a new example fails it until it takes
``--quick`` and has a row in ``CHECKS``. Each check parses the example's printed result (or the files
it wrote) and asserts a direction with a bound; the bounds come from real ``--quick`` runs on the
shared 2-core machine (measured values in the comments) with a wide margin, because the runs are
seeded but float summation order may differ between machines. The fast tests keep the docstrings
(full-run time, ``--quick`` command) and the gallery page ``docs/examples.md`` in step with the folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "examples"
EXAMPLES = sorted(path.stem for path in EXAMPLES_DIR.glob("*.py"))
GALLERY = ROOT / "docs" / "examples.md"
NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def find(pattern: str, text: str) -> tuple[str, ...]:
    """The groups of the first match of ``pattern`` in ``text``; fails the test, showing the text, if none."""
    match = re.search(pattern, text)
    assert match, f"no line matches {pattern!r} in:\n{text[-3000:]}"
    return match.groups()


def floats(pattern: str, text: str) -> list[float]:
    return [float(group) for group in find(pattern, text)]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- one check per example: (stdout, output folder) -> None ------------------------------------------


def check_attention_huggingface(out: str, folder: Path) -> None:
    (diff,) = floats(rf"padded vs alone, max \|diff\|: {NUMBER}", out)
    assert diff < 1e-4  # measured 1.7e-6: the padding mask reaches SOFT
    losses = [float(x) for x in re.findall(rf"step \d+: loss {NUMBER}", out)]
    assert len(losses) == 2 and losses[-1] < losses[0]  # measured 0.6856 -> 0.6781


def check_attention_soft_layer(out: str, folder: Path) -> None:
    (padded,) = floats(rf"padded vs alone, max \|diff\| at real positions: {NUMBER}", out)
    assert padded < 1e-5  # measured 0
    assert len(re.findall(r"N=\s*\d+: forward\+backward", out)) == 3
    assert "image tokens: (4, 784, 64)" in out
    (exact,) = floats(rf"exact when N <= landmarks: max \|diff\| = {NUMBER}", out)
    assert exact < 1e-10  # measured 3e-15 in float64


def check_attention_vit_fashion_mnist(out: str, folder: Path) -> None:
    (accuracy,) = floats(rf"test accuracy {NUMBER} on 1000 images", out)
    assert accuracy > 0.15  # measured 0.22 after one epoch of 1,000 images; chance is 0.10
    assert list(folder.glob("**/metrics.csv")), "the CSV logger wrote nothing under --out"


def check_attribution_callback(out: str, folder: Path) -> None:
    lines = re.findall(r"prompt (\d): positions by importance \[([\d, ]+)\], heatmap (\S+\.png)", out)
    assert len(lines) == 2
    for _, ranking, png in lines:
        positions = [int(p) for p in ranking.split(",")]
        assert sorted(positions) == list(range(len(positions)))  # every context position ranked once
        path = folder.parent / png  # printed relative to the working directory, folder's parent
        assert is_png(path) and path.resolve().is_relative_to(folder.resolve())
    (soft_ns,) = floats(rf"'reagent/soft_ns': {NUMBER}", out)
    assert 0.0 <= soft_ns <= 1.0  # measured 0.568 (seeded, 2 quick epochs)


def check_attribution_reagent(out: str, folder: Path) -> None:
    prob, passes, met, probes = find(r"\(p=([\d.]+)\); ReAGent: (\d+) forward passes, (\d+)/(\d+) probes", out)
    assert 0.0 < float(prob) <= 1.0 and int(passes) > 0
    assert int(probes) == 2 and int(met) >= 1  # measured 2/2 met the stopping rule within 20 steps
    scores = re.findall(rf"top tokens \[.+\], Soft-NS {NUMBER}, Soft-NC {NUMBER}", out)
    assert len(scores) == 2  # ReAGent and gradient x input
    for soft_ns, soft_nc in scores:
        assert 0.0 <= float(soft_ns) <= 1.0 and float(soft_nc) >= 0.0
    assert is_png(folder / "reagent.png") and "<" in (folder / "reagent.html").read_text()


def check_bgpo_addition(out: str, folder: Path) -> None:
    before, after = floats(rf"warm-up: masked-diffusion loss on 512 fixed problems {NUMBER} -> {NUMBER}", out)
    assert after < 0.75 * before  # measured 2.565 -> 1.433 in 100 steps
    for accuracy in re.findall(rf"held-out accuracy {NUMBER}", out):
        assert 0.0 <= float(accuracy) <= 1.0
    (reward,) = floats(rf"RL steps +1-5 +mean rollout reward {NUMBER}", out)
    assert 0.0 <= reward <= 1.0


def check_diffusion_digits(out: str, folder: Path) -> None:
    import json

    results = json.loads((folder / "diffusion_digits.json").read_text())
    assert results["classifier_accuracy"] > 0.9  # measured 0.970 after 100 steps
    assert results["noise_loss_after"] < 0.7 * results["noise_loss_before"]  # measured 7.13 -> 2.08 in 5 steps
    assert results["weights_loss_after"] < results["weights_loss_before"]  # measured 0.880 -> 0.659 in 3 steps
    assert is_png(folder / "noise_before_after.png") and is_png(folder / "weights_before_after.png")
    assert "seconds per phase" in out


def check_fp4_formats(out: str, folder: Path) -> None:
    table = re.findall(rf"^(\w+) +(\d+) +{NUMBER} +(\d+) +{NUMBER}$", out, re.M)  # format block error bytes bits
    rows = {m[0]: (int(m[1]), float(m[2]), float(m[4])) for m in table}
    assert {"nvfp4", "mxfp4"} <= rows.keys()
    nvfp4_error, mxfp4_error = rows["nvfp4"][1], rows["mxfp4"][1]
    assert nvfp4_error < 0.12 and mxfp4_error > 1.5 * nvfp4_error  # measured 0.090 vs 0.177 (outlier channels)
    assert 4.5 <= rows["nvfp4"][2] < 4.51 and 4.25 <= rows["mxfp4"][2] < 4.26  # 4 bits + FP8 / E8M0 per block
    (blocks,) = floats(rf"1x16 blocks: rel. error {NUMBER}", out)
    (tiles,) = floats(rf"16x16 tiles: rel. error {NUMBER}", out)
    assert blocks < tiles  # measured 0.0955 < 0.1111: a 2D tile shares one scale among more values


def check_fp4_nvfp4_trainer(out: str, folder: Path) -> None:
    start, fp32, nvfp4 = floats(
        rf"held-out loss {NUMBER} before training; after 15 steps: fp32 {NUMBER}, NVFP4 {NUMBER}", out
    )
    assert fp32 < start - 1.0 and nvfp4 < start - 1.0  # measured 5.580 -> 3.434 (fp32), 3.436 (NVFP4)
    assert abs(nvfp4 / fp32 - 1) < 0.05  # measured +0.07%


def check_noprop_fashion_mnist(out: str, folder: Path) -> None:
    # Eight batches are too few for accuracy above chance (measured 0.087; 47 batches gave 0.11), so the
    # check is on the blocks' denoising loss, which falls from the first batches on.
    first, last, batches = floats(rf"train_block_loss: {NUMBER} -> {NUMBER} over (\d+) batches", out)
    assert batches == 8 and last < 0.98 * first  # measured 44.33 -> 42.16 (means of the first / last 4 batches)
    (accuracy,) = floats(rf"NoProp-DT \(learned embedding\): test accuracy {NUMBER}", out)
    assert 0.0 <= accuracy <= 1.0


def check_odice_pendulum(out: str, folder: Path) -> None:
    (score,) = floats(rf"expert: \d+ transitions, behaviour policy scores {NUMBER}", out)
    assert score > 80  # the expert data set: measured 103.4 (100 = expert, 0 = random)
    steps = [int(s) for s in re.findall(r"step +(\d+) +normalized return", out)]
    assert steps == list(range(0, 201, 20))  # evaluated every 20 of the 200 steps
    assert list(folder.glob("Pendulum-v1-expert-2000-s0.npz")), "the data set was not cached under --cache-dir"


def check_zo_bench_ddp(out: str, folder: Path) -> None:
    steps, start, final, identical = find(
        r"steps=(\d+) start_mse=([\d.]+) final_mse=([\d.]+) ranks_bitwise_identical=(\w+)", out
    )
    assert steps == "20" and identical == "True"
    assert float(final) < 0.97 * float(start)  # measured 10.53 -> 9.77


def check_zo_bench_lora_adam(out: str, folder: Path) -> None:
    loss_before, loss_after, acc_before, acc_after = floats(
        rf"held-out loss {NUMBER} -> {NUMBER} nats/token, accuracy {NUMBER} -> {NUMBER}", out
    )
    assert loss_after < loss_before - 0.5 and acc_after > acc_before  # measured 4.863 -> 3.868, 0.006 -> 0.131


def check_zo_quickstart(out: str, folder: Path) -> None:
    start, end, steps, no_grad = find(
        rf"Lightning \+ ZerothOrder: loss {NUMBER} -> {NUMBER} in (\d+) steps, no .grad allocated: (\w+)", out
    )
    assert steps == "40" and no_grad == "True"
    assert float(end) < float(start) - 0.07  # measured 3.500 -> 3.360
    raw_start, raw_end = floats(rf"raw PyTorch loop: loss {NUMBER} -> {NUMBER}", out)
    assert raw_end < raw_start - 0.07  # measured 3.500 -> 3.366


Check = Callable[[str, Path], None]
# example: (arguments after --quick, with {out} for the output folder; check)
CHECKS: dict[str, tuple[list[str], Check]] = {
    "attention_huggingface": ([], check_attention_huggingface),
    "attention_soft_layer": ([], check_attention_soft_layer),
    "attention_vit_fashion_mnist": (["--out", "{out}"], check_attention_vit_fashion_mnist),
    "attribution_callback": (["--out", "{out}"], check_attribution_callback),
    "attribution_reagent": (["--out", "{out}"], check_attribution_reagent),
    "bgpo_addition": ([], check_bgpo_addition),
    "diffusion_digits": (["--out", "{out}"], check_diffusion_digits),
    "fp4_formats": ([], check_fp4_formats),
    "fp4_nvfp4_trainer": ([], check_fp4_nvfp4_trainer),
    "noprop_fashion_mnist": ([], check_noprop_fashion_mnist),
    "odice_pendulum": (["--cache-dir", "{out}"], check_odice_pendulum),
    "zo_bench_ddp": ([], check_zo_bench_ddp),
    "zo_bench_lora_adam": ([], check_zo_bench_lora_adam),
    "zo_quickstart": ([], check_zo_quickstart),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_quick(name: str, tmp_path: Path) -> None:
    assert name in CHECKS, f"examples/{name}.py has no row in CHECKS: add what its --quick run must print"
    extra, check = CHECKS[name]
    folder = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # One intra-op thread per process, as in the rest of the suite: the tiny models run no slower and the
    # time does not collapse when other jobs share the cores (two OpenMP threads then wait on each other).
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(EXAMPLES_DIR / f"{name}.py"), "--quick"]
    command += [arg.replace("{out}", str(folder)) for arg in extra]
    # cwd is the temporary folder: anything an example writes by default lands there, not in the checkout
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{' '.join(command)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    check(run.stdout, folder)


def test_every_example_has_a_check() -> None:
    assert sorted(CHECKS) == EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_docstring_states_full_time_and_quick_command(name: str) -> None:
    source = (EXAMPLES_DIR / f"{name}.py").read_text()
    docstring = re.match(r'^"""(.*?)"""', source, re.S)
    assert docstring, f"examples/{name}.py must open with a docstring"
    text = docstring.group(1)
    assert f"python examples/{name}.py" in text and "--quick" in text
    # the full-run time, measured, e.g. "about 5 minutes" / "20 s" (see docs/examples.md for the machine)
    assert re.search(r"\d+(?:\.\d+)? ?(?:s|min|minutes?|seconds?|hours?)\b", text), text


def test_gallery_shows_every_example() -> None:
    gallery = GALLERY.read_text()
    missing = [name for name in EXAMPLES if f"examples/{name}.py" not in gallery]
    assert not missing, f"docs/examples.md lacks {missing}"
    for image in re.findall(r"!\[[^\]]*\]\((img/examples/[^)]+)\)", gallery):
        assert is_png(ROOT / "docs" / image), image
