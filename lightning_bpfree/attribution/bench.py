"""``bpfree attribution-bench``: ReAGent against gradient attributions, and instruction importance.

Three parts, each a table in the JSON / Markdown output and a panel of the PNG:

1. **Toy retrieval** (also the whole of ``--quick``): a one-layer LM trained in seconds on key-value
   retrieval, where the answer-bearing token is known. Recall@1 of that token among the context,
   plus Soft-NS / Soft-NC, for every method.
2. **Faithfulness on SmolLM2-135M-Instruct**: next-token predictions on opening fragments of the
   standard library's docstrings (real English text on the machine). Soft-NS / Soft-NC (and hard
   NS / NC at 20 % of the tokens) for ReAGent, gradient x input, integrated gradients, last-layer
   attention and random scores; also each method's ratio to random, as the ReAGent paper reports.
3. **Instruction importance on SmolLM2**: chat prompts whose instructions can be checked (repeat,
   upper-case, count, yes/no, one word). The greedy response's gradient x input (Wu et al. 2023),
   its importance density and the instruction score, for responses that followed the instruction
   against those that did not (one-sided Welch t-test). JVP and backward attributions are
   compared on the first prompt (difference and time).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_bpfree import benchmarking
from lightning_bpfree.attribution.baselines import (
    attention_attribution,
    gradient_x_input,
    integrated_gradients,
    random_attribution,
)
from lightning_bpfree.attribution.density import importance_density, instruction_score, jvp_attribution
from lightning_bpfree.attribution.heatmap import heatmap_html, plot_heatmap, token_strings
from lightning_bpfree.attribution.metrics import Comprehensiveness, SoftComprehensiveness, SoftSufficiency, Sufficiency
from lightning_bpfree.attribution.model_interface import next_token_logits
from lightning_bpfree.attribution.reagent import reagent_attribution
from lightning_bpfree.attribution.retrieval_task import PAIRS, retrieval_batch, train_retrieval_model
from lightning_bpfree.cli import command_name

NAME = command_name(__name__)
Method = Callable[[Any, Tensor, int, torch.Generator], Tensor]


def methods(
    reagent_options: dict[str, Any], ig_steps: int, reagent_log: list[dict[str, float]] | None = None
) -> dict[str, Method]:
    """The compared attributions, each ``(model, input_ids [N], target_id, generator) -> [N]``.

    ``reagent_log`` (if given) receives each ReAGent run's mean probe steps, converged share and forward passes.
    """

    def reagent(m, x, y, g) -> Tensor:
        result = reagent_attribution(m, x, y, generator=g, return_details=True, **reagent_options)
        if reagent_log is not None:
            reagent_log.append(
                {"mean_probe_steps": float(result.probe_steps.float().mean()),
                 "converged_share": float(result.converged.float().mean()),
                 "forward_passes": result.forward_passes}
            )  # fmt: skip
        return result.importance

    table: dict[str, Method] = {
        "ReAGent": reagent,
        "gradient x input": lambda m, x, y, g: gradient_x_input(m, x, y, method="backward"),
        "integrated gradients": lambda m, x, y, g: integrated_gradients(m, x, y, steps=ig_steps),
        "attention (last layer)": lambda m, x, y, g: attention_attribution(m, x),
        "random": lambda m, x, y, g: random_attribution(x, generator=g),
    }
    return table


def faithfulness_rows(
    model, prompts: list[Tensor], compared: dict[str, Method], seed: int, desc: str, answer_positions=None
) -> tuple[list[dict[str, Any]], dict[str, list[Tensor]]]:
    """Mean Soft-NS / Soft-NC / NS / NC (and recall@1 when ``answer_positions`` is given) per method."""
    metrics = {
        "soft_ns": SoftSufficiency(model, num_samples=2, seed=seed, normalization="rank"),
        "soft_nc": SoftComprehensiveness(model, num_samples=2, seed=seed, normalization="rank"),
        "ns@20%": Sufficiency(model, ratio=0.2),
        "nc@20%": Comprehensiveness(model, ratio=0.2),
    }
    names = list(compared)
    values: dict[str, dict[str, list[float]]] = {n: {k: [] for k in [*metrics, "seconds", "hit"]} for n in names}
    attributions: dict[str, list[Tensor]] = {n: [] for n in names}
    for index, ids in enumerate(benchmarking.progress(prompts, desc=desc)):
        with torch.no_grad():
            target = int(next_token_logits(model, ids[None])[0].argmax())
        rows = []
        for name in names:
            start = time.perf_counter()
            importance = compared[name](model, ids, target, torch.Generator().manual_seed(seed + index))
            values[name]["seconds"].append(time.perf_counter() - start)
            attributions[name].append(importance)
            rows.append(importance.float())
            if answer_positions is not None:
                hit = int(importance[:PAIRS].argmax()) == int(answer_positions[index])
                values[name]["hit"].append(float(hit))
        stacked = torch.stack(rows)
        batch = ids.expand(len(names), -1)
        for key, metric in metrics.items():
            for name, score in zip(names, metric.scores(batch, stacked, target).tolist()):
                values[name][key].append(score)
    table = []
    for name in names:
        row: dict[str, Any] = {"method": name}
        for key in [*metrics, "hit", "seconds"]:
            finite = [v for v in values[name][key] if v == v]
            if key == "hit" and answer_positions is None:
                continue
            row["recall@1" if key == "hit" else key] = sum(finite) / len(finite) if finite else float("nan")
        table.append(row)
    baseline = next(r for r in table if r["method"] == "random")
    for row in table:
        for key in ("soft_ns", "soft_nc"):
            row[f"{key}/random"] = row[key] / baseline[key] if baseline[key] > 0 else float("nan")
    return table, attributions


def docstring_prompts(tokenizer, model, count: int, length: int, min_prob: float = 0.2) -> list[Tensor]:
    """Opening ``length`` tokens of stdlib docstrings whose next token SmolLM2 predicts with p >= min_prob."""
    from lightning_bpfree.data import stdlib_docstrings

    prompts = []
    for text in stdlib_docstrings():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < length + 1:
            continue
        sequence = torch.tensor(ids[:length])
        with torch.no_grad():
            if float(torch.softmax(next_token_logits(model, sequence[None])[0], -1).max()) < min_prob:
                continue
        prompts.append(sequence)
        if len(prompts) == count:
            break
    return prompts


# (instruction, checker of the response text) -- the input text is appended after the instruction.
INSTRUCTIONS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("Repeat the following text exactly:", lambda response, text: response.strip()[:15] == text.strip()[:15]),
    (
        "Rewrite the following text in uppercase letters:",
        lambda response, text: sum(c.isupper() for c in response) > 0.8 * max(1, sum(c.isalpha() for c in response)),
    ),
    (
        "How many words are in the following text? Answer with a number only.",
        lambda response, text: response.strip()[:1].isdigit(),
    ),
    (
        "Does the following text talk about files? Answer only yes or no.",
        lambda response, text: response.strip().lower().startswith(("yes", "no")),
    ),
    (
        "Give a one-word title for the following text.",
        lambda response, text: len(response.strip().split("\n")[0].split()) <= 2,
    ),
]


def instruction_prompt(tokenizer, instruction: str, text: str) -> tuple[Tensor, Tensor, Tensor]:
    """Chat-formatted ids, a mask of the instruction's tokens and a mask of the user message's tokens."""
    pieces = [
        ("<|im_start|>user\n", "template"),
        (instruction, "instruction"),
        ("\n" + text, "input"),
        ("<|im_end|>\n<|im_start|>assistant\n", "template"),
    ]
    ids: list[int] = []
    kinds: list[str] = []
    for piece, kind in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        kinds += [kind] * len(piece_ids)
    instruction_mask = torch.tensor([k == "instruction" for k in kinds])
    user_mask = torch.tensor([k in ("instruction", "input") for k in kinds])
    return torch.tensor(ids), instruction_mask, user_mask


def greedy_response(model, prompt: Tensor, tokens: int, stop_id: int | None) -> Tensor:
    """The model's greedy continuation (up to ``tokens`` ids, stopping after ``stop_id``)."""
    with torch.no_grad():
        out = model.generate(prompt[None], max_new_tokens=tokens, do_sample=False, eos_token_id=stop_id)
    return out[0, prompt.numel() :]


def instruction_rows(model, tokenizer, count: int, response_tokens: int, text_tokens: int) -> dict[str, Any]:
    """Instruction score of followed vs not-followed responses, and the JVP / backward comparison."""
    from lightning_bpfree.data import stdlib_docstrings

    texts = []
    for doc in stdlib_docstrings():
        first = doc.split("\n")[0].strip()
        ids = tokenizer(first, add_special_tokens=False)["input_ids"]
        if len(ids) >= 6:
            texts.append(tokenizer.decode(ids[:text_tokens]))
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    records = []
    check: dict[str, Any] = {}
    for index in benchmarking.progress(range(count), desc="instruction importance"):
        instruction, followed = INSTRUCTIONS[index % len(INSTRUCTIONS)]
        text = texts[(7 * index) % len(texts)]
        prompt, instruction_mask, user_mask = instruction_prompt(tokenizer, instruction, text)
        response = greedy_response(model, prompt, response_tokens, stop_id)
        response_text = tokenizer.decode(response, skip_special_tokens=True)
        positions = user_mask.nonzero().squeeze(1)
        start = time.perf_counter()
        attribution = jvp_attribution(model, prompt, response, method="backward", positions=positions)
        backward_seconds = time.perf_counter() - start
        if index == 0:
            start = time.perf_counter()
            forward_mode = jvp_attribution(model, prompt, response, method="jvp", positions=positions, chunk_size=8)
            check = {
                "prompt_tokens": prompt.numel(), "attributed_positions": positions.numel(),
                "response_tokens": response.numel(), "jvp_seconds": time.perf_counter() - start,
                "backward_seconds": backward_seconds,
                "max_abs_difference": float((forward_mode - attribution).abs().max()),
                "max_abs_attribution": float(attribution.abs().max()),
            }  # fmt: skip
        density = importance_density(attribution[:, user_mask])
        score = instruction_score(density, instruction_mask[user_mask])
        # Baseline for the score: the same number of input-text tokens (instruction sizes differ).
        input_share = float(density[~instruction_mask[user_mask]].mean())
        records.append(
            {"instruction": instruction, "text": text, "response": response_text,
             "followed": bool(followed(response_text, text)), "instruction_score": score,
             "instruction_density_mean": float(density[instruction_mask[user_mask]].mean()),
             "input_density_mean": input_share}
        )  # fmt: skip
    return {"records": records, "jvp_check": check}


def summarize_runs(log: list[dict[str, float]]) -> dict[str, float]:
    """Means over ReAGent runs: probe steps, share of probes that met the stopping rule, forward passes."""
    return {key: sum(run[key] for run in log) / max(1, len(log)) for key in log[0]} if log else {}


def summarize_instructions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, flag in (("followed", True), ("not followed", False)):
        group = [r for r in records if r["followed"] == flag]
        means = {
            key: sum(r[key] for r in group) / len(group) if group else float("nan")
            for key in ("instruction_score", "instruction_density_mean", "input_density_mean")
        }
        rows.append(
            {"responses": label, "n": len(group), "instruction score": means["instruction_score"],
             "mean density, instruction tokens": means["instruction_density_mean"],
             "mean density, input tokens": means["input_density_mean"]}
        )  # fmt: skip
    followed = [r["instruction_score"] for r in records if r["followed"]]
    missed = [r["instruction_score"] for r in records if not r["followed"]]
    p_value = float("nan")
    if len(followed) >= 2 and len(missed) >= 2:
        from scipy.stats import ttest_ind

        p_value = float(ttest_ind(followed, missed, equal_var=False, alternative="greater").pvalue)
    for row in rows:
        row["Welch p (followed > not)"] = p_value
    return rows


def plot(path: Path, toy: list[dict], smol: list[dict] | None, records: list[dict] | None) -> Path:
    panels = 1 + (smol is not None) + (records is not None)
    fig, axes = benchmarking.new_figure(ncols=panels, width=5.0, height=3.8)
    for ax, (title, rows) in zip(axes, [("toy retrieval (trained 1-layer LM)", toy), ("SmolLM2-135M-Instruct", smol)]):
        if rows is None:
            continue
        names = [r["method"] for r in rows]
        xs = torch.arange(len(names)).float()
        ax.bar(xs - 0.2, [r["soft_ns"] for r in rows], width=0.4, label="Soft-NS")
        ax.bar(xs + 0.2, [r["soft_nc"] for r in rows], width=0.4, label="Soft-NC")
        ax.set_xticks(xs.tolist(), [n.replace(" (last layer)", "").replace(" ", "\n", 1) for n in names], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    if records is not None:
        ax = axes[-1]
        for x, flag in ((0, True), (1, False)):
            scores = [r["instruction_score"] for r in records if r["followed"] == flag]
            ax.scatter([x + 0.05 * (i % 5 - 2) for i in range(len(scores))], scores, alpha=0.7)
            if scores:
                ax.hlines(sum(scores) / len(scores), x - 0.25, x + 0.25, color="black")
        ax.set_xticks([0, 1], ["followed", "not followed"])
        ax.set_ylabel("instruction score")
        ax.set_title("instruction importance (SmolLM2)", fontsize=9)
    return benchmarking.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.bench_parser(NAME, __doc__)
    parser.add_argument("--prompts", type=benchmarking.positive_int, default=6, help="SmolLM2 faithfulness prompts")
    parser.add_argument("--prompt-tokens", type=benchmarking.positive_int, default=16, help="tokens per faithfulness prompt")
    parser.add_argument("--instruction-prompts", type=benchmarking.positive_int, default=12, help="SmolLM2 instruction prompts")
    parser.add_argument("--toy-prompts", type=benchmarking.positive_int, default=30, help="retrieval prompts on the toy model")
    parser.add_argument("--num-probes", type=benchmarking.positive_int, default=8, help="ReAGent probes (the paper: 16)")
    parser.add_argument("--max-probe-steps", type=benchmarking.positive_int, default=60, help="ReAGent step cap (the paper: 3000-5000)")
    args = parser.parse_args(argv)
    with benchmarking.using_threads(benchmarking.torch_threads(args.threads)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.quick:
        args.toy_prompts = min(args.toy_prompts, 10)
    started = time.perf_counter()
    figures: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}

    toy_model = train_retrieval_model(seed=args.seed)
    ids, answers, asked = retrieval_batch(args.toy_prompts, torch.Generator().manual_seed(args.seed + 100))
    toy_log: list[dict[str, float]] = []
    toy_options = {"num_probes": 16, "keep_top_n": 2, "stopping_top_k": 1, "max_probe_steps": args.max_probe_steps}
    toy_methods = methods(toy_options, ig_steps=32, reagent_log=toy_log)
    toy_rows, _ = faithfulness_rows(toy_model, list(ids), toy_methods, args.seed, "toy retrieval", asked)
    figures["toy_retrieval"] = toy_rows
    figures["toy_reagent_runs"] = toy_log
    tables = [
        "## Toy key-value retrieval (answer-bearing token known)",
        benchmarking.format_table(toy_rows),
        "ReAGent runs (means):",
        benchmarking.format_table([summarize_runs(toy_log)]),
    ]

    smol_rows = records = None
    if not args.quick:
        from lightning_bpfree.models import load_smollm2

        model, tokenizer = load_smollm2()
        prompts = docstring_prompts(tokenizer, model, args.prompts, args.prompt_tokens)
        reagent_options = {
            "num_probes": args.num_probes, "max_probe_steps": args.max_probe_steps,
            "exclude_ids": list(tokenizer.all_special_ids),
        }  # fmt: skip
        smol_log: list[dict[str, float]] = []
        smol_rows, attributions = faithfulness_rows(
            model, prompts, methods(reagent_options, 10, smol_log), args.seed, "SmolLM2 faithfulness"
        )
        figures["smollm2_faithfulness"] = smol_rows
        figures["smollm2_reagent_runs"] = smol_log
        figures["smollm2_prompts"] = [tokenizer.decode(p) for p in prompts]
        tables += [
            "## SmolLM2-135M-Instruct: faithfulness of next-token explanations",
            benchmarking.format_table(smol_rows),
            "ReAGent runs (means):",
            benchmarking.format_table([summarize_runs(smol_log)]),
        ]
        tokens = token_strings(tokenizer, prompts[0])
        with torch.no_grad():
            target = tokenizer.decode([int(next_token_logits(model, prompts[0][None])[0].argmax())])
        for name in ("ReAGent", "gradient x input"):
            slug = name.split()[0].lower()
            title = f"{name}: next token {target!r}"
            plot_heatmap(tokens, attributions[name][0], args.out / f"heatmap_{slug}.png", title=title)
            (args.out / f"heatmap_{slug}.html").write_text(heatmap_html(tokens, attributions[name][0], title, target))

        result = instruction_rows(model, tokenizer, args.instruction_prompts, response_tokens=8, text_tokens=12)
        records = result["records"]
        figures["instruction_records"] = records
        figures["jvp_check"] = result["jvp_check"]
        instruction_table = summarize_instructions(records)
        figures["instruction_importance"] = instruction_table
        tables += [
            "## SmolLM2-135M-Instruct: instruction importance (gradient x input density)",
            benchmarking.format_table(instruction_table),
            "## JVP vs backward on the first instruction prompt",
            benchmarking.format_table([result["jvp_check"]]),
        ]
    figures["total_seconds"] = time.perf_counter() - started
    figures["threads"] = torch.get_num_threads()
    benchmarking.finish(args.out, NAME, figures, "\n\n".join(tables), lambda path: plot(path, toy_rows, smol_rows, records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
