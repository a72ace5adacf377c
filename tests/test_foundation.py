"""The shared pieces: benchmarking helpers, the console script, embedded data and models."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_bpfree import benchmarking, cli, data, models


def allocate(megabytes: int) -> dict:
    block = torch.ones(megabytes * 2**20 // 4)
    return {"sum": float(block.sum())}


def test_run_in_subprocess_reports_the_child_peak_memory():
    small = benchmarking.run_in_subprocess("test_foundation:allocate", megabytes=1)
    large = benchmarking.run_in_subprocess("test_foundation:allocate", megabytes=300)
    assert large["sum"] == 300 * 2**20 // 4
    # each child against its own memory after imports, so import-time differences cancel
    assert 250 * 2**20 < large["peak_rss_bytes"] - large["import_rss_bytes"] < 450 * 2**20
    assert small["peak_rss_bytes"] - small["import_rss_bytes"] < 100 * 2**20


def test_run_in_subprocess_raises_with_the_child_error():
    with pytest.raises(RuntimeError, match="megabytes"):
        benchmarking.run_in_subprocess("test_foundation:allocate")
    with pytest.raises(ValueError, match="module:function"):
        benchmarking.run_in_subprocess("no_colon")


def test_format_table():
    table = benchmarking.format_table([{"a": 1, "b": 0.123456}, {"a": 2, "b": None}])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| 2 |  |"]


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "zo-bench", "fp4-bench", "noprop-bench"):
        assert name in out
    assert cli.main(["no-such-command"]) == 2


CAPABILITIES = ("zo", "fp4", "attention", "diffusion", "noprop", "odice", "bgpo", "attribution")


def test_cli_help_lists_exactly_demo_one_bench_per_capability_and_zo_scale(capsys):
    assert cli.main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines[lines.index("commands:") + 1 :] if line.startswith("  ")]
    assert listed == ["demo", "zo-bench", "zo-scale", *(f"{c}-bench" for c in CAPABILITIES[1:])]
    assert list(cli.COMMANDS) == listed


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_maps_to_a_module_with_main_that_names_itself(name):
    module = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(module.main)
    assert cli.command_name(module.__name__) == name
    assert getattr(module, "NAME", name) == name  # the output folder and file stem


@pytest.mark.parametrize(
    ("old", "new", "options"),
    [("zo-memory", "zo-bench", ["--part", "memory"]), ("fp4-sweep", "fp4-bench", []),
     ("soft-bench", "attention-bench", []), ("adjoint-bench", "diffusion-bench", [])],
)  # fmt: skip
def test_old_names_dispatch_to_the_new_command_with_a_notice(old, new, options, monkeypatch, capsys):
    module = importlib.import_module(cli.COMMANDS[new][0])
    calls = []
    monkeypatch.setattr(module, "main", lambda argv: calls.append(argv) or 0)
    assert cli.main([old, "--quick", "--out", "x"]) == 0
    assert calls == [[*options, "--quick", "--out", "x"]]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deprecated" in err[0] and new in err[0]
    assert old not in cli.COMMANDS


def test_command_name_refuses_a_module_without_command():
    with pytest.raises(KeyError, match="COMMANDS"):
        cli.command_name("lightning_bpfree.fp4.quantize")


def test_torch_threads_order_and_using_threads_restores(monkeypatch):
    monkeypatch.delenv("BPFREE_THREADS", raising=False)
    assert benchmarking.torch_threads(3, default=1) == 3
    assert benchmarking.torch_threads(None, default=1) == 1
    assert benchmarking.torch_threads() >= 1
    monkeypatch.setenv("BPFREE_THREADS", "2")
    assert benchmarking.torch_threads(None, default=1) == 2
    with pytest.raises(ValueError, match="--threads"):
        benchmarking.torch_threads(0)
    before = torch.get_num_threads()
    with benchmarking.using_threads(1) as threads:
        assert threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_finish_prints_and_writes_json_table_and_plot(tmp_path, capsys):
    def plot(path):
        fig, (ax,) = benchmarking.new_figure()
        ax.plot([0, 1], [1, 0])
        benchmarking.save_figure(fig, path)

    path = benchmarking.finish(tmp_path / "out", "x-bench", {"a": 1.5}, "| a |\n|---|\n| 1.5 |", plot)
    assert path == tmp_path / "out" / "x-bench.json" and path.read_text().startswith("{")
    assert (tmp_path / "out" / "x-bench.md").read_text() == "| a |\n|---|\n| 1.5 |\n"
    assert (tmp_path / "out" / "x-bench.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert out.startswith("| a |") and "x-bench.png" in out.splitlines()[-1]


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "lightning_bpfree.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "bpfree" in result.stdout


def test_digits():
    images, labels = data.digits()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 1 and set(labels.unique().tolist()) == set(range(10))


def test_fashion_mnist_and_its_error(tmp_path):
    images, labels = data.fashion_mnist("test", limit=100)
    assert images.shape == (100, 1, 28, 28) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and labels.max() <= 9
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist(root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.fashion_mnist("validation")


FETCH = Path(__file__).resolve().parents[1] / data.FASHION_MNIST_FETCH
MISSING_MESSAGE = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"


def _fake_tool(folder: Path, name: str, body: str) -> None:
    tool = folder / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)


def test_fetch_script_does_nothing_when_the_loader_finds_the_data(tmp_path, monkeypatch):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    result = subprocess.run(["bash", str(FETCH), sys.executable], capture_output=True, text=True)
    assert result.returncode == 0 and f"found in {tmp_path}" in result.stdout


def test_fetch_script_without_apt_stops_with_the_commands_to_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cat").symlink_to(subprocess.run(["which", "cat"], capture_output=True, text=True).stdout.strip())
    result = subprocess.run(["/bin/bash", str(FETCH), "--user", "--prefix", str(tmp_path), "unused-python"],
                            capture_output=True, text=True, env={"PATH": str(bin_dir)})  # fmt: skip
    assert result.returncode == 1
    assert "apt-get and dpkg are not available" in result.stderr and MISSING_MESSAGE in result.stderr
    assert f"cp /tmp/fmnist/usr/share/datasets/fashion-mnist/*.gz {tmp_path}/share/datasets/fashion-mnist/" in result.stderr


def test_fetch_script_installs_as_root_and_downloads_without_root(tmp_path):
    """apt-get is a fake that logs its arguments and fails, the interpreter a fake whose loader finds
    nothing: as root the script runs apt-get update and install, then (or without root, at once) the
    unprivileged download, then stops with the commands to run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    _fake_tool(bin_dir, "apt-get", f'echo "$*" >> {log}; exit 1')
    _fake_tool(bin_dir, "sudo", "exit 1")  # no password-less sudo
    _fake_tool(bin_dir, "python", f'case "$*" in *sys.prefix*) echo {tmp_path}/prefix;; *) exit 1;; esac')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(FETCH), str(bin_dir / "python")], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and MISSING_MESSAGE in result.stderr
    calls = [line.split() for line in log.read_text().splitlines()]
    as_root = [["update", "-qq"], ["install", "-y", "-qq", "dataset-fashion-mnist"]] if os.geteuid() == 0 else []
    assert calls[: len(as_root)] == as_root
    assert calls[len(as_root)] == ["download", "-qq", "dataset-fashion-mnist"]
    # no system package list: private lists in a temporary folder, which fail here too
    assert calls[len(as_root) + 1][-2:] == ["update", "-qq"] and "Dir::State::Lists=" in " ".join(calls[-1])
    assert len(calls) == len(as_root) + 2 and "apt-get update into private lists failed" in result.stderr


@pytest.mark.slow
def test_fetch_script_unpacks_debians_package_without_root_where_the_loader_reads_it(tmp_path):
    """The real unprivileged branch: apt-get download + dpkg -x into <prefix>/share/datasets."""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        pytest.skip("apt-get and dpkg are needed")
    result = subprocess.run(["bash", str(FETCH), "--user", "--prefix", str(tmp_path), sys.executable],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "share" / "datasets" / "fashion-mnist"
    assert f"{sys.prefix}/share/datasets/fashion-mnist" in data.FASHION_MNIST_DIRS  # the default prefix's folder
    images, labels = data.fashion_mnist("test", root=folder)
    assert images.shape == (10_000, 1, 28, 28) and labels.bincount().tolist() == [1000] * 10


def test_stdlib_corpus_is_real_english_and_splits_by_document():
    texts = data.stdlib_docstrings()
    assert len(texts) > 200 and all(len(t) >= 200 for t in texts)
    assert sum(" the " in t for t in texts) > 0.8 * len(texts)
    train, held_out = data.split_texts(texts, 0.1, seed=0)
    assert len(held_out) == int(len(texts) * 0.1) and not set(train) & set(held_out)
    assert data.split_texts(texts, 0.1, seed=0) == (train, held_out)


def test_token_blocks():
    class Tokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    blocks = data.token_blocks(Tokenizer(), ["abc", "de"], seq_len=3)
    assert blocks.tolist() == [[97, 98, 99], [0, 100, 101]]
    with pytest.raises(ValueError, match="seq_len"):
        data.token_blocks(Tokenizer(), ["a"], seq_len=10)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_tiny_causal_lm_builds_offline_and_is_seeded(arch):
    model = models.tiny_causal_lm(arch, vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, seed=3)
    ids = torch.randint(3, 50, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    assert 3.0 < loss.item() < 5.0  # about log(50) for random weights
    again = models.tiny_causal_lm(arch, vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="arch"):
        models.tiny_causal_lm("t5")
