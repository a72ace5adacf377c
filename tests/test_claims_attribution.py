"""The headline numbers of docs/attribution.md, checked at a size CI can run (all tests here are slow).

- toy key-value retrieval (``bpfree attribution-bench --quick``): ReAGent finds the answer-bearing
  token and is more faithful than random scores;
- SmolLM2-135M-Instruct, the benchmark's first 2 docstring prompts: ReAGent's Soft-NS over random's;
- SmolLM2, "The capital of France is Paris, and the capital of Germany is" -> " Berlin.": forward-mode
  (JVP) and back-propagated gradient x input agree in float32, and against a float64 truth computed
  here by central differences the forward mode is the more accurate of the two.

Every bound below comes from a measurement on the 2-core CPU machine (torch 2.13, seed 0), quoted
next to it, with a margin for other platforms' rounding and sampling.
"""

import json
import types

import pytest
import torch
from torch import Tensor

from lightning_bpfree.attribution import bench
from lightning_bpfree.attribution.baselines import random_attribution
from lightning_bpfree.attribution.density import jvp_attribution
from lightning_bpfree.attribution.metrics import SoftSufficiency
from lightning_bpfree.attribution.model_interface import next_token_logits
from lightning_bpfree.attribution.reagent import reagent_attribution

PROMPT = "The capital of France is Paris, and the capital of Germany is"
RESPONSE = " Berlin."


@pytest.fixture(scope="module")
def smollm2():
    from lightning_bpfree.models import load_smollm2

    return load_smollm2()


@pytest.mark.slow
def test_toy_retrieval_reagent_finds_the_answer_token_and_beats_random(tmp_path):
    # The benchmark's CI form: the trained one-layer retrieval LM, 10 prompts, every method.
    assert bench.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "attribution-bench.json").read_text())
    rows = {row["method"]: row for row in figures["toy_retrieval"]}
    reagent, random, attention = rows["ReAGent"], rows["random"], rows["attention (last layer)"]
    # recall@1 among the 5 context tokens (chance 0.2). Measured on 10 prompts: ReAGent 0.9, attention 1.0,
    # random 0.0; on the docs' 30 prompts: 0.933, 1.000 and 0.167.
    assert reagent["recall@1"] >= 0.7
    assert reagent["recall@1"] >= random["recall@1"] + 0.4
    assert attention["recall@1"] >= 0.9  # the one-layer model reads its answer off its only attention layer
    # faithfulness over random (rank-normalised). Measured: Soft-NS 1.000 vs 0.680 (1.47x), Soft-NC 0.749 vs
    # 0.254 (2.95x); on 30 prompts 1.43x and 2.26x.
    assert reagent["soft_ns/random"] >= 1.2
    assert reagent["soft_nc/random"] >= 1.5
    # the stopping rule (target in the top 1 with 2 tokens kept) fires within a few probe steps: measured 4.9
    run = bench.summarize_runs(figures["toy_reagent_runs"])
    assert run["converged_share"] == 1.0 and run["mean_probe_steps"] <= 15


@pytest.mark.slow
def test_smollm2_reagent_soft_sufficiency_beats_random(smollm2):
    """Soft-NS / random for ReAGent: 3.51 on the benchmark's 6 prompts; here its first 2 prompts.

    On one prompt Soft-NS is noisy: with the benchmark's 2 keep-masks per score, one random ranking's
    Soft-NS ranged 0.005-0.32 on the same prompt, and two mask seeds moved ReAGent's by up to 0.2. So
    the metric draws 16 masks, and random's Soft-NS is the mean over 8 rankings per prompt (the
    benchmark's single ranking per prompt tends to fall below that mean: the distribution is skewed).
    """
    model, tokenizer = smollm2
    prompts = bench.docstring_prompts(tokenizer, model, 2, 16)
    metric = SoftSufficiency(model, num_samples=16, seed=0, normalization="rank")
    reagent_scores, random_scores = [], []
    for index, ids in enumerate(prompts):
        with torch.no_grad():
            target = int(next_token_logits(model, ids[None])[0].argmax())
        generator = torch.Generator().manual_seed(index)
        # the benchmark's ReAGent settings on SmolLM2: 8 probes, at most 60 steps, no special tokens as replacements
        importance = reagent_attribution(
            model, ids, target, num_probes=8, max_probe_steps=60,
            exclude_ids=list(tokenizer.all_special_ids), generator=generator,
        )  # fmt: skip
        randoms = torch.stack([random_attribution(ids, generator=generator) for _ in range(8)])
        scores = metric.scores(ids.expand(9, -1), torch.cat([importance[None].float(), randoms.float()]), target)
        reagent_scores.append(float(scores[0]))
        random_scores.append(float(scores[1:].mean()))
    ratio = sum(reagent_scores) / sum(random_scores)
    # Measured: ReAGent 0.167 and 0.257 against random means 0.111 and 0.169, ratio 1.51. The test's own
    # noise is large (over 3 probe seeds x 2 mask seeds ReAGent averaged 0.17 and 0.20 on these prompts,
    # single runs 0.09-0.43, against random means of 0.12 and 0.10 over 32 rankings: about 1.7), so the
    # bound only asks for a clear win over random; the benchmark's 3.51 uses one random ranking per prompt.
    assert ratio >= 1.2


def _full_precision_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Make the RMSNorms compute in the input's dtype.

    transformers' ``LlamaRMSNorm`` casts to float32 and back, so a ``.double()`` LLaMA is only
    float32-accurate (a 1e-9 relative change of the input embeddings moved its logits by 9e-6). In
    float32 this is the same function; in float64 it makes the model a float64 truth.
    """

    def forward(self, hidden: Tensor) -> Tensor:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight.to(hidden.dtype) * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)
    return model


def _central_differences(model, prompt: Tensor, response: Tensor, step: float = 1e-5) -> Tensor:
    """``I[m, n] = d p(y_m) / d alpha`` at ``alpha = 0`` for ``e_n -> (1 + alpha) e_n``, which is
    ``(dp/de_n) . e_n``, by central differences in the model's dtype: ``[M, N]``.

    In float64 with full-precision norms, step 1e-5 and 1e-4 agreed to 1.6e-8 and this matched a
    float64 autograd backward to 9e-10 (measured), far below the float32 errors tested against it.
    """
    num_inputs, num_outputs = prompt.numel(), response.numel()
    sequence = torch.cat([prompt, response[:-1]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(sequence)[None]
        batch = embeds.repeat(2 * num_inputs, 1, 1)
        for n in range(num_inputs):
            batch[2 * n, n] *= 1 + step
            batch[2 * n + 1, n] *= 1 - step
        logits = model(inputs_embeds=batch).logits[:, num_inputs - 1 : num_inputs - 1 + num_outputs]
        probs = torch.softmax(logits, dim=-1).gather(-1, response.view(1, -1, 1).expand(2 * num_inputs, -1, 1))
        probs = probs.squeeze(-1).view(num_inputs, 2, num_outputs)
    return ((probs[:, 0] - probs[:, 1]) / (2 * step)).T


@pytest.mark.slow
def test_smollm2_jvp_agrees_with_backward_and_is_the_more_accurate_in_float32(smollm2):
    from lightning_bpfree.models import load_smollm2

    torch.set_num_threads(2)  # the forward-mode pass over 13 stacked copies dominates this test
    model, tokenizer = smollm2
    prompt = torch.tensor(tokenizer(PROMPT)["input_ids"])
    response = torch.tensor(tokenizer(RESPONSE)["input_ids"])
    assert (prompt.numel(), response.numel()) == (13, 2)
    forward = jvp_attribution(model, prompt, response)  # float32, forward mode, all 13 positions
    backward = jvp_attribution(model, prompt, response, method="backward")
    # the two float32 modes: measured max |difference| 5.43e-5 on entries up to 0.083 (docs: 5.4e-5)
    assert 0.05 < float(backward.abs().max()) < 0.2
    assert float((forward - backward).abs().max()) < 1.5e-4

    # float64 truth: the same model in float64, norms included, differentiated by central differences
    model64 = _full_precision_norms(load_smollm2(dtype=torch.float64)[0])
    truth = _central_differences(model64, prompt, response)
    forward_error = float((forward.double() - truth).abs().max())
    backward_error = float((backward.double() - truth).abs().max())
    # Measured: forward mode 3.8e-7 from the truth, backward 5.4e-5 (its float32 softmax backward is the
    # less accurate step), a factor of 140.
    assert forward_error < 5e-6
    assert backward_error < 2e-4
    assert backward_error > 10 * forward_error
