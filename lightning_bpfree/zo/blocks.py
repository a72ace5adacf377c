"""Block-wise zeroth-order: perturb and update one block of parameters at a time.

ZO-Bench (arXiv 2402.11592) finds that estimating the gradient of one block at a time (with its
own pair of forwards) lowers the variance of the estimate; its code finds the blocks with regexes
that only fit OPT. :func:`find_blocks` finds them from the module tree of any model and the result
goes to any ZO optimizer: ``ZOAdam(model.parameters(), blocks=find_blocks(model, "layer"))``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_bpfree.validation import check_bool
from lightning_bpfree.zo.parts import ZOPart

LEVELS = ("layer", "module", "linear")


class ParameterBlocks(ZOPart):
    """Block-wise ZO as a part of the step (pass ``ZOOptimizer(..., blocks=...)``, which builds this).

    Args:
        blocks: a sequence of parameter lists, or a ``{name: parameters}`` mapping as
            :func:`find_blocks` returns. Each step perturbs, estimates and updates one block after
            the other; trainable parameters in no block are not trained.
    """

    def __init__(self, blocks: Any):
        if isinstance(blocks, dict):
            blocks = list(blocks.values())
        if isinstance(blocks, torch.Tensor) or not isinstance(blocks, list | tuple):
            raise TypeError(
                f"blocks must be a list of parameter lists or a name -> parameters dict, got {type(blocks).__name__}"
            )
        self.blocks = [list(block) for block in blocks]
        if not self.blocks or any(not block or not all(isinstance(p, torch.Tensor) for p in block) for block in self.blocks):
            raise ValueError("blocks must be a non-empty list of non-empty lists of parameters")

    def before_step(self, optimizer: Any, closure: Callable[[], Any]) -> None:
        # checked at each step: parameter groups may be added after construction
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for number, block in enumerate(self.blocks):
            if any(id(p) not in known for p in block):
                raise ValueError(f"blocks[{number}] holds a tensor that is not among the optimizer's parameters")

    def scopes(self) -> Sequence[Sequence[torch.Tensor]]:
        return self.blocks


def _repeated_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of repeated blocks (the transformer layers): the largest list of same-class modules."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            classes = {type(child) for child in module}
            size = sum(p.numel() for p in module.parameters())
            if len(classes) == 1 and (best is None or size > best[2]):
                best = (name, module, size)
    return None if best is None else best[:2]


def find_blocks(model: nn.Module, level: str = "layer", trainable_only: bool = True) -> dict[str, list[torch.Tensor]]:
    """Split a model's parameters into blocks, in forward order.

    Args:
        model: any ``nn.Module`` (a transformers model, a peft model ...).
        level: ``"layer"``: one block per repeated layer (the largest ``nn.ModuleList`` of
            same-class modules, e.g. ``model.layers``), plus one ``"<rest>"`` block for the other
            parameters (embeddings, final norm, head); ``"module"``: one block per module that owns
            parameters directly; ``"linear"``: one block per ``nn.Linear`` plus ``"<rest>"``; or a
            regular expression with one group: parameters whose name matches go to the block
            named by the group, the rest to ``"<rest>"``.
        trainable_only: keep only parameters with ``requires_grad=True``.

    Returns:
        ``{block name: [parameters]}`` covering every (trainable) parameter exactly once; empty
        blocks are dropped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable_only = check_bool("trainable_only", trainable_only)
    if not isinstance(level, str) or not level:
        raise ValueError(f"level must be one of {LEVELS} or a regular expression, got {level!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    blocks: dict[str, list[torch.Tensor]] = {}

    def add(block: str, param: torch.Tensor) -> None:
        blocks.setdefault(block, []).append(param)

    if level == "layer":
        found = _repeated_layers(model)
        if found is None:
            raise ValueError("level='layer' found no nn.ModuleList of repeated layers in the model; use 'module'")
        prefix, layers = found
        layer_of = {id(p): f"{prefix}.{i}" if prefix else str(i) for i, layer in enumerate(layers) for p in layer.parameters()}
        for _, p in named:
            add(layer_of.get(id(p), "<rest>"), p)
    elif level in ("module", "linear"):
        owner = {}
        for module_name, module in model.named_modules():
            if level == "module" or isinstance(module, nn.Linear):
                for p in module.parameters(recurse=False):
                    owner.setdefault(id(p), module_name or "<root>")
        for _, p in named:
            add(owner.get(id(p), "<rest>"), p)
    else:
        try:
            pattern = re.compile(level)
        except re.error as error:
            raise ValueError(f"level must be one of {LEVELS} or a regular expression, got {level!r} ({error})") from None
        if pattern.groups != 1:
            raise ValueError(f"a level pattern needs exactly one group naming the block, got {level!r}")
        for name, p in named:
            match = pattern.search(name)
            add(match.group(1) if match else "<rest>", p)
    rest = blocks.pop("<rest>", None)
    if rest:
        blocks["<rest>"] = rest
    return blocks
