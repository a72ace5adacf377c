"""``bpfree noprop-bench``: argument checks, the memory probe, and (slow) the quick run end to end."""

import json

import pytest
import torch

from lightning_bpfree.noprop import bench


def test_bench_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, no traceback
        bench.main(["--methods", "backprop", "sgd"])
    assert exit_info.value.code == 2 and "argument --methods: invalid choice: 'sgd'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="methods must be among"):  # the Python entry point
        bench.build_module("sgd", num_blocks=2, hidden=8, channels=[4], lr=1e-3)


@pytest.mark.parametrize("method", bench.METHODS)
def test_step_memory_probe_trains_each_method(method):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        moved = bench.step_memory(method, batch_size=4, num_blocks=2, hidden=16, channels=[4, 8], steps=1)
        # every trainable tensor takes its AdamW step: a probe that trained nothing (or half) fails here
        assert moved["trainable"] > 4 and moved["changed"] == moved["trainable"]
    finally:
        torch.set_num_threads(threads)


def test_target_verdict_uses_mean_of_last_epochs_and_both_dt_inferences():
    curves = {
        "backprop": ("backprop", [0.50, 0.90, 0.80]),
        "noprop-dt": ("noprop-dt", [0.10, 0.83, 0.85]),
        bench.DT_WITHOUT_NOISE: ("noprop-dt", [0.10, 0.84, 0.87]),
    }
    noisy, deterministic = bench.target_verdicts(curves, last=2)
    # backprop 85.0; DT 84.0 is within 1 point, DT without noise 85.5 is above
    assert noisy.startswith("noprop-dt within 1 point") and ": yes (84.00 vs 85.00)" in noisy
    assert deterministic.startswith(bench.DT_WITHOUT_NOISE) and ": yes (85.50 vs 85.00)" in deterministic
    curves["noprop-dt"] = ("noprop-dt", [0.10, 0.83, 0.84])  # 83.5: 1.5 points behind
    assert ": no (83.50 vs 85.00)" in bench.target_verdicts(curves, last=2)[0]
    assert bench.target_verdicts({"noprop-dt": curves["noprop-dt"]}, last=2) == []


def test_test_accuracy_without_inference_noise_matches_a_noise_free_run_and_restores_the_module():
    from torch.utils.data import TensorDataset

    from lightning_bpfree.noprop import NoPropDT

    module = NoPropDT(10, (1, 28, 28), num_blocks=2, hidden=16, channels=(4, 8))
    images, labels = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    module.train()
    torch.manual_seed(5)
    accuracy = bench._test_accuracy(module, TensorDataset(images, labels), inference_noise=False)
    assert module.training and module.net.inference_noise
    module.eval()
    module.net.inference_noise = False
    torch.manual_seed(5)  # the same z_0, and no other random draw when the noise term is off
    with torch.no_grad():
        expected = (module(images).argmax(-1) == labels).sum().item() / 12
    assert accuracy == expected
    module.net.inference_noise = True
    torch.manual_seed(5)
    with torch.no_grad():
        noisy = module.net.sample(images)
    torch.manual_seed(5)
    module.net.inference_noise = False
    with torch.no_grad():
        assert not torch.equal(module.net.sample(images), noisy)  # the switch really changes inference


def test_train_config_can_evaluate_after_the_last_epoch_only_and_times_cpu_seconds():
    # the CI-size claim checks (tests/test_claims_noprop.py) train without per-epoch evaluation
    result = bench.train_config(
        "noprop-dt", epochs=2, train_limit=64, test_limit=40, batch_size=32, num_blocks=2, hidden=8,
        channels=[4], lr=1e-3, seed=0, inference_samples=(1, 2), evaluate_every_epoch=False,
    )  # fmt: skip
    assert len(result["accuracy"]) == len(result["accuracy_without_inference_noise"]) == 1
    assert len(result["epoch_seconds"]) == len(result["epoch_cpu_seconds"]) == 2
    assert all(seconds > 0 for seconds in result["epoch_cpu_seconds"])
    # accuracies are counts over 40 test images
    for accuracy in [*result["accuracy"], *result["final_accuracy_by_inference_samples"].values()]:
        assert 0 <= accuracy <= 1 and abs(40 * accuracy - round(40 * accuracy)) < 1e-4
    assert sorted(result["final_accuracy_by_inference_samples"]) == [1, 2]


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_and_plot(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "noprop-bench.json").read_text())
    assert set(figures["results"]) == set(bench.METHODS)
    for result in figures["results"].values():
        assert len(result["accuracy"]) == figures["config"]["epochs"]
        assert result["step_memory_mib"] > 0
    dt = figures["results"]["noprop-dt"]
    assert len(dt["accuracy_without_inference_noise"]) == figures["config"]["epochs"]
    assert list(dt["final_accuracy_by_inference_samples"]) == ["2"]  # JSON keys
    assert len(figures["target"]) == 2 and all("within 1 point of backprop" in line for line in figures["target"])
    # backprop learns something in two short epochs (chance is 10%)
    assert figures["results"]["backprop"]["accuracy"][-1] > 0.3
    assert (tmp_path / "noprop-bench.png").stat().st_size > 10_000
