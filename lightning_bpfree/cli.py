"""The ``bpfree`` console script: ``bpfree demo`` and one ``bpfree <capability>-bench`` per capability.

The capability is the package folder (``zo``, ``fp4``, ``attention``, ...). Each subcommand lives in
its capability's package as a ``main(argv) -> int`` function and is imported only when called, so
``bpfree --help`` stays fast and a missing optional dependency only affects its own subcommand.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lightning_bpfree.zo.demo", "MeZO fine-tuning of SmolLM2-135M-Instruct in a Lightning Trainer"),
    "zo-bench": ("lightning_bpfree.zo.bench", "ZO optimizers and enhancements; --part memory: ZO step vs inference and FO"),
    "zo-scale": ("lightning_bpfree.zo.scale_bench", "the largest LLaMA each method trains in a memory budget (ZO vs FO)"),
    "fp4-bench": ("lightning_bpfree.fp4.bench", "FP4 formats and recipe ablations: error and training loss"),
    "attention-bench": ("lightning_bpfree.attention.bench", "SOFT vs softmax attention: time and memory vs length"),
    "diffusion-bench": ("lightning_bpfree.diffusion.bench", "adjoint vs direct backprop through sampling"),
    "noprop-bench": ("lightning_bpfree.noprop.bench", "NoProp DT/CT/FM vs backprop on Fashion-MNIST"),
    "odice-bench": ("lightning_bpfree.odice.bench", "orthogonal vs semi vs true gradient, offline RL"),
    "bgpo-bench": ("lightning_bpfree.bgpo.bench", "BGPO memory vs Monte Carlo samples, reward curves"),
    "attribution-bench": ("lightning_bpfree.attribution.bench", "ReAGent vs gradient attributions"),
}
"""Command name -> (module defining ``main(argv) -> int``, one-line help). The name is also the
benchmark's output folder (``bpfree-results/<name>/``) and file stem (``<name>.json`` / ``.md`` / ``.png``)."""

ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "zo-memory": ("zo-bench", ("--part", "memory")),
    "fp4-sweep": ("fp4-bench", ()),
    "soft-bench": ("attention-bench", ()),
    "adjoint-bench": ("diffusion-bench", ()),
}
"""Old command name -> (new command, options put in front of the user's). Deprecated: they print a notice."""


def command_name(module: str) -> str:
    """The command whose ``main`` lives in ``module`` (a dotted name; pass ``__name__``).

    Benchmarks call this for their output folder and file names, so that each name is written once,
    in :data:`COMMANDS`. ``"__main__"`` (``python -m lightning_bpfree.fp4.bench``) is resolved to
    the module that runs.
    """
    if module == "__main__":
        module = sys.modules["__main__"].__spec__.name
    for name, (target, _) in COMMANDS.items():
        if target == module:
            return name
    raise KeyError(f"no bpfree command runs {module!r}; add it to lightning_bpfree.cli.COMMANDS")


def _usage() -> str:
    lines = ["usage: bpfree <command> [options]", "       bpfree --version", "", "commands:"]
    lines += [f"  {name:<18} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`bpfree <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``bpfree <command> [options]`` to the command's ``main``; old names still run, with a notice.

    ``bpfree --version`` (or ``-V``) prints the package version. A bad option ends in the command's
    argparse usage error (``SystemExit(2)``, the message naming the option).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lightning_bpfree import __version__

        print(f"bpfree (lightning_bpfree) {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name in ALIASES:
        name, options = ALIASES[name]
        rest = [*options, *rest]
        print(f"bpfree: {argv[0]!r} is deprecated, running 'bpfree {' '.join([name, *options])}'", file=sys.stderr)
    if name not in COMMANDS:
        print(f"bpfree: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
