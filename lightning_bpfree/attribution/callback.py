"""``ReAGentCallback``: token-importance heatmaps of fixed prompts, written during validation."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_bpfree.attribution.heatmap import heatmap_html, plot_heatmap, token_strings
from lightning_bpfree.attribution.metrics import soft_faithfulness
from lightning_bpfree.attribution.model_interface import as_token_sequence
from lightning_bpfree.attribution.reagent import reagent_attribution
from lightning_bpfree.validation import check_bool, check_options, check_positive_int, check_seed

_REAGENT_OPTIONS = tuple(
    name
    for name, parameter in inspect.signature(reagent_attribution).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "return_details"
) + ("target_id",)


class ReAGentCallback(Callback):
    """Explain the model's next-token prediction on fixed prompts with ReAGent after validation.

    Every ``every_n_epochs`` validation epochs (not during the sanity check) and on global rank 0,
    each prompt gets ``prompt_<i>.png`` and ``prompt_<i>.html`` under ``<dirpath>/epoch=<e>/``, the
    PNGs go to any logger whose experiment has ``add_image`` (TensorBoard), and the mean
    faithfulness is logged as ``reagent/soft_ns`` and ``reagent/soft_nc`` with the mean probe steps
    as ``reagent/probe_steps``. ReAGent needs forward passes only, so this works for models trained
    without back-propagation (zeroth-order, FP4) as well.

    Args:
        prompts: strings (needs ``tokenizer``) or int64 token-id tensors ``[N]``.
        every_n_epochs: run after every n-th validation epoch.
        tokenizer: a transformers tokenizer, to encode string prompts and label the heatmaps.
        dirpath: output folder; default ``<trainer.log_dir or default_root_dir>/reagent``.
        model_attr: attribute of the LightningModule holding the causal LM (``"model"``); when the
            module has no such attribute the LightningModule itself is called with ``input_ids``.
        faithfulness: also compute Soft-NS / Soft-NC of each explanation (needs ``inputs_embeds``
            support; six extra single-sequence forward passes per prompt).
        seed: probes of prompt i use ``torch.Generator().manual_seed(seed + i)``, so reruns repeat.
        **reagent_options: passed to ``reagent_attribution`` (``num_probes``, ``keep_top_n``, ...).
    """

    def __init__(
        self,
        prompts: Sequence[str | Tensor],
        every_n_epochs: int = 1,
        *,
        tokenizer: Any = None,
        dirpath: str | Path | None = None,
        model_attr: str | None = "model",
        faithfulness: bool = True,
        seed: int = 0,
        **reagent_options: Any,
    ) -> None:
        if isinstance(prompts, (str, Tensor)) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings or token-id tensors")
        if any(isinstance(p, str) for p in prompts) and tokenizer is None:
            raise ValueError("string prompts need a tokenizer: pass tokenizer=..., or give token-id tensors")
        for prompt in prompts:
            if isinstance(prompt, Tensor):
                as_token_sequence(prompt.flatten(), "prompts")
            elif not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings or token-id tensors, got {type(prompt).__name__}")
        # Options reagent_attribution takes by keyword, except those this callback sets itself.
        check_options("ReAGentCallback", reagent_options, _REAGENT_OPTIONS)
        if model_attr is not None and not isinstance(model_attr, str):
            raise TypeError(f"model_attr must be an attribute name or None, got {model_attr!r}")
        self.prompts = list(prompts)
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        self.tokenizer = tokenizer
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.model_attr = model_attr
        self.faithfulness = check_bool("faithfulness", faithfulness)
        self.seed = check_seed("seed", seed)
        self.reagent_options = reagent_options
        self.last_results: list[dict[str, Any]] = []

    def _encode(self, prompt: str | Tensor) -> Tensor:
        if isinstance(prompt, Tensor):
            return prompt.flatten().long()
        return torch.tensor(self.tokenizer(prompt)["input_ids"], dtype=torch.long)

    def _model(self, pl_module: LightningModule):
        if self.model_attr and hasattr(pl_module, self.model_attr):
            return getattr(pl_module, self.model_attr)
        return pl_module

    def _folder(self, trainer: Trainer) -> Path:
        root = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "reagent"
        return root / f"epoch={trainer.current_epoch}"

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not trainer.is_global_zero:
            return
        model = self._model(pl_module)
        folder = self._folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.last_results = [self._explain(model, index, prompt, folder, trainer) for index, prompt in
                             enumerate(self.prompts)]  # fmt: skip
        for key in ("soft_ns", "soft_nc", "probe_steps"):
            values = [r[key] for r in self.last_results if r.get(key) is not None and r[key] == r[key]]
            if values:
                pl_module.log(f"reagent/{key}", sum(values) / len(values), rank_zero_only=True)

    def _explain(self, model, index: int, prompt, folder: Path, trainer: Trainer) -> dict[str, Any]:
        ids = self._encode(prompt)
        options = {"generator": torch.Generator().manual_seed(self.seed + index), **self.reagent_options}
        result = reagent_attribution(model, ids, return_details=True, **options)
        tokens = token_strings(self.tokenizer, ids)
        target = token_strings(self.tokenizer, torch.tensor([result.target_id]))[0]
        title = f"epoch {trainer.current_epoch}, prompt {index}: next token {target!r} (p={result.target_prob:.3f})"
        png = plot_heatmap(tokens, result.importance, folder / f"prompt_{index}.png", title=title)
        page = folder / f"prompt_{index}.html"
        page.write_text(heatmap_html(tokens, result.importance, title=title, target=target))
        record: dict[str, Any] = {
            "prompt": index, "tokens": tokens, "importance": result.importance.tolist(), "target": target,
            "target_prob": result.target_prob, "probe_steps": float(result.probe_steps.float().mean()),
            "png": str(png), "html": str(page),
        }  # fmt: skip
        if self.faithfulness:
            record.update(soft_faithfulness(model, ids, result.importance, result.target_id, seed=self.seed + index))
        self._send_image(trainer, f"reagent/prompt_{index}", png)
        return record

    @staticmethod
    def _send_image(trainer: Trainer, tag: str, png: Path) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                import matplotlib.image

                pixels = matplotlib.image.imread(png)[..., :3]
                experiment.add_image(tag, pixels, trainer.global_step, dataformats="HWC")
