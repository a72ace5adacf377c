"""Every ``bpfree`` command through bad options: argparse's usage error (exit status 2) naming the
option, never a traceback and never a silent default. In-process and fast: no benchmark runs,
the parser refuses the option before anything is loaded."""

from __future__ import annotations

import argparse

import pytest
import torch

import lightning_bpfree
from lightning_bpfree import benchmarking, cli

COMMON = [  # options every command has (bench_parser)
    ["--seed", "-1"], ["--seed", "abc"], ["--seed", "1.5"], ["--threads", "0"], ["--threads", "-2"],
    ["--threads", "1.5"], ["--no-such-option"],
]  # fmt: skip

BAD_OPTIONS: dict[str, list[list[str]]] = {
    "demo": [
        ["--steps", "0"], ["--steps", "-1"], ["--batch-size", "0"], ["--seq-len", "0"], ["--lr", "nan"],
        ["--lr", "inf"], ["--lr", "-1e-3"], ["--lr", "fast"], ["--eps", "0"], ["--eval-every", "0"],
        ["--eval-blocks", "-3"],
    ],
    "zo-bench": [
        ["--steps", "-1"], ["--steps", "0"], ["--batch-size", "0"], ["--seq-len", "-1"], ["--eval-blocks", "0"],
        ["--part", "foo"], ["--model", "foo"], ["--only", "sgd"], ["--device", "foo"],
        *([] if torch.cuda.is_available() else [["--device", "cuda"]]),
    ],
    "zo-scale": [
        ["--budget-gib", "0"], ["--budget-gib", "nan"], ["--methods", "foo"], ["--seq-len", "0"], ["--batch-size", "0"],
        ["--trial-timeout", "0"], ["--trial-timeout", "inf"],
    ],
    "fp4-bench": [["--steps", "0"], ["--steps", "-5"], ["--configs", "foo"]],
    "attention-bench": [
        ["--lengths", "0"], ["--lengths", "512", "-64"], ["--lengths", "100"], ["--methods", "foo"],
        ["--max-eager-tokens", "0"], ["--num-landmarks", "0"], ["--repeats", "0"], ["--timeout", "0"],
        ["--timeout", "nan"], ["--vit-train", "0"], ["--vit-epochs", "0"], ["--vit-patch", "5"],
    ],
    "diffusion-bench": [["--steps", "0"], ["--steps", "4", "-1"], ["--batch", "0"]],
    "noprop-bench": [
        ["--methods", "foo"], ["--epochs", "0"], ["--train-limit", "-1"], ["--test-limit", "0"],
        ["--batch-size", "0"], ["--num-blocks", "0"], ["--hidden", "0"], ["--channels", "16", "0"], ["--lr", "0"],
        ["--lr", "inf"], ["--dt-inference-samples", "0"],
    ],
    "odice-bench": [
        ["--env", "Foo-v0"], ["--datasets", "foo"], ["--seeds", "0"], ["--steps", "-1"], ["--eval-every", "0"],
        ["--transitions", "0"], ["--hidden", "0"], ["--batch-size", "0"], ["--lr", "-1"], ["--lam", "0"],
        ["--lam", "1.5"], ["--lam", "nan"], ["--eta", "-1"], ["--eta", "inf"],
    ],
    "bgpo-bench": [],
    "attribution-bench": [
        ["--prompts", "0"], ["--prompt-tokens", "0"], ["--instruction-prompts", "-1"], ["--toy-prompts", "0"],
        ["--num-probes", "0"], ["--max-probe-steps", "0"],
    ],
}  # fmt: skip

CASES = [(name, bad) for name in cli.COMMANDS for bad in [*COMMON, *BAD_OPTIONS[name]]]


def test_every_command_is_walked():
    assert set(BAD_OPTIONS) == set(cli.COMMANDS)


@pytest.mark.parametrize(("command", "bad"), CASES, ids=[f"{c} {' '.join(b)}" for c, b in CASES])
def test_a_bad_option_is_a_usage_error_naming_it(command, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--quick", *bad])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f"usage: bpfree {command}" in err and bad[0] in err and "Traceback" not in err


@pytest.mark.parametrize("old", sorted(cli.ALIASES))
def test_old_names_refuse_bad_options_too(old, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([old, "--seed", "-1"])
    assert exit_info.value.code == 2 and "argument --seed" in capsys.readouterr().err


class _Parsed(Exception):
    """Raised instead of parsing, to stop a command right after it built its parser."""


def parser_of(command: str, monkeypatch) -> argparse.ArgumentParser:
    built: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        built.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        cli.main([command])
    return built[0]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_has_help_and_numbers_are_checked(command, monkeypatch):
    """No option without help text (``--seed`` had none), and no bare ``int``/``float`` type without
    choices: it takes ``-1``, ``0``, ``nan`` and ``inf`` alike."""
    parser = parser_of(command, monkeypatch)
    options = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert [a.dest for a in options if not a.help] == []
    assert [a.dest for a in options if a.type in (int, float) and not a.choices] == []


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bpfree (lightning_bpfree) {lightning_bpfree.__version__}"
    assert cli.main(["-V"]) == 0 and lightning_bpfree.__version__ in capsys.readouterr().out
    assert cli.main(["--help"]) == 0 and "bpfree --version" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option_type", "text", "value"),
    [
        (benchmarking.positive_int, "3", 3),
        (benchmarking.nonnegative_int, "0", 0),
        (benchmarking.positive_float, "1e-3", 1e-3),
        (benchmarking.nonnegative_float, "0", 0.0),
        (benchmarking.seed_int, "0", 0),
        (benchmarking.float_in(0.0, 1.0, low_open=True), "1", 1.0),
        (benchmarking.torch_device, "cpu", "cpu"),
    ],
)
def test_option_types_accept_good_values(option_type, text, value):
    result = option_type(text)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(
    ("option_type", "text", "message"),
    [
        (benchmarking.positive_int, "0", "must be an int >= 1, got 0"),
        (benchmarking.positive_int, "2.0", "expected a positive int, got '2.0'"),
        (benchmarking.nonnegative_int, "-1", "must be an int >= 0, got -1"),
        (benchmarking.positive_float, "nan", "must be a finite number, got nan"),
        (benchmarking.positive_float, "-inf", "must be a finite number, got -inf"),
        (benchmarking.positive_float, "0", "must be > 0, got 0"),
        (benchmarking.nonnegative_float, "-0.5", "must be >= 0, got -0.5"),
        (benchmarking.seed_int, "-1", "must be an int >= 0"),
        (benchmarking.float_in(0.0, 1.0, low_open=True), "0", "must be > 0 and <= 1, got 0"),
        (benchmarking.torch_device, "gpu", "expected a torch device"),
    ],
)
def test_option_types_refuse_bad_values_with_the_reason(option_type, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match="^" + message.replace("(", r"\(").replace("+", r"\+")):
        option_type(text)
