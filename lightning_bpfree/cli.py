"""The ``bpfree`` console script: one subcommand per demo or benchmark.

Each subcommand lives in its capability's package as a ``main(argv) -> int`` function and is
imported only when called, so ``bpfree --help`` stays fast and a missing optional dependency only
affects its own subcommand.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lightning_bpfree.zo.demo", "MeZO fine-tuning of SmolLM2-135M-Instruct in a Lightning Trainer"),
    "zo-memory": ("lightning_bpfree.zo.memory_bench", "peak memory and time: ZO step vs inference vs FO"),
    "zo-bench": ("lightning_bpfree.zo.bench", "every ZO optimizer and enhancement, accuracy and memory"),
    "fp4-sweep": ("lightning_bpfree.fp4.bench", "FP4 formats and recipe ablations: error and training loss"),
    "soft-bench": ("lightning_bpfree.attention.bench", "SOFT vs softmax attention: time and memory vs length"),
    "adjoint-bench": ("lightning_bpfree.diffusion.bench", "adjoint vs direct backprop through sampling"),
    "noprop-bench": ("lightning_bpfree.noprop.bench", "NoProp DT/CT/FM vs backprop on Fashion-MNIST"),
    "odice-bench": ("lightning_bpfree.odice.bench", "orthogonal vs semi vs true gradient, offline RL"),
    "bgpo-bench": ("lightning_bpfree.bgpo.bench", "BGPO memory vs Monte Carlo samples, reward curves"),
    "attribution-bench": ("lightning_bpfree.attribution.bench", "ReAGent vs gradient attributions"),
}


def _usage() -> str:
    lines = ["usage: bpfree <command> [options]", "", "commands:"]
    lines += [f"  {name:<18} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "`bpfree <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``bpfree <command> [options]`` to the command's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"bpfree: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
