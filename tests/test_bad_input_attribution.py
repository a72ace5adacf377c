"""Bad input at every public attribution entry point: a clear error naming the argument, or the
documented non-finite behaviour (non-finite model output raises, naming the forward pass)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bpfree.attribution import (
    FrequencyTokenSampler,
    LanguageModelTokenSampler,
    SoftComprehensiveness,
    SoftSufficiency,
    Sufficiency,
    UniformTokenSampler,
    attention_attribution,
    gradient_x_input,
    importance_density,
    instruction_score,
    integrated_gradients,
    jvp_attribution,
    random_attribution,
    reagent_attribution,
)
from lightning_bpfree.models import tiny_causal_lm

VOCAB = 32


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, num_layers=1)


class Poisoned(nn.Module):
    """Wraps a causal LM; its logits become NaN (or +inf) everywhere, or only for inputs holding ``trigger``."""

    def __init__(self, inner, value=float("nan"), trigger=None):
        super().__init__()
        self.inner, self.value, self.trigger = inner, value, trigger

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        logits = self.inner(input_ids=input_ids, inputs_embeds=inputs_embeds).logits
        if self.trigger is None:
            return logits.clone().fill_(self.value)
        hit = (input_ids == self.trigger).any(-1)
        return torch.where(hit[:, None, None], torch.full_like(logits, self.value), logits)


IDS = torch.tensor([3, 4, 5, 6, 7, 8])


# ---- item 15: non-finite model output raises ----------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_reagent_raises_on_non_finite_logits(model, value):
    with pytest.raises(ValueError, match=r"model output \(logits\).*unperturbed input"):
        reagent_attribution(Poisoned(model, value), IDS, max_probe_steps=3, keep_top_n=2)


def test_reagent_names_the_probe_step_when_only_perturbed_inputs_give_nan(model):
    # Token 9 never appears in IDS, so only replaced inputs that contain it break the model.
    with pytest.raises(ValueError, match=r"logits.*probe step"):
        reagent_attribution(
            Poisoned(model, trigger=9), IDS, max_probe_steps=50, num_probes=8, keep_top_n=2,
            replacing_ratio=0.9, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip


def test_minus_inf_logits_for_single_tokens_are_fine(model):
    def masked(ids, **kwargs):
        logits = model(ids).logits.clone()
        logits[..., 0] = float("-inf")
        return logits

    importance = reagent_attribution(masked, IDS, max_probe_steps=3, keep_top_n=2)
    assert torch.isfinite(importance).all()


@pytest.mark.parametrize("method", ["jvp", "backward"])
def test_jvp_attribution_raises_on_nan_logits(model, method):
    with pytest.raises(ValueError, match=r"model output \(logits\)"):
        jvp_attribution(Poisoned(model), IDS, torch.tensor([3, 4]), method=method)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: gradient_x_input(m, IDS),
        lambda m: gradient_x_input(m, IDS, target_id=3),
        lambda m: integrated_gradients(m, IDS, target_id=3, steps=2),
        lambda m: SoftSufficiency(m).update(IDS, torch.rand(6)),
        lambda m: SoftComprehensiveness(m).update(IDS, torch.rand(6), 3),
        lambda m: Sufficiency(m).update(IDS, torch.rand(6)),
        lambda m: LanguageModelTokenSampler(m).proposals(IDS),
    ],
)
def test_other_logit_readers_raise_on_nan_logits(model, call):
    with pytest.raises(ValueError, match=r"model output \(logits\)"):
        call(Poisoned(model))


def test_attention_attribution_still_works_on_a_finite_model():
    gpt2 = tiny_causal_lm("gpt2", vocab_size=VOCAB, hidden_size=16, num_layers=1)
    weights = attention_attribution(gpt2, IDS)
    assert weights.shape == (6,) and torch.isfinite(weights).all()
    with pytest.raises(ValueError, match="layer"):
        attention_attribution(gpt2, IDS, layer=5)
    with pytest.raises(TypeError, match="layer"):
        attention_attribution(gpt2, IDS, layer="last")


# ---- section 3: token ids outside the vocabulary ------------------------------------------------

OUT_OF_VOCAB = torch.tensor([3, 4, VOCAB])


@pytest.mark.parametrize(
    "call",
    [
        lambda m, ids: reagent_attribution(m, ids, max_probe_steps=2, keep_top_n=1),
        lambda m, ids: jvp_attribution(m, ids, torch.tensor([3])),
        lambda m, ids: gradient_x_input(m, ids),
        lambda m, ids: integrated_gradients(m, ids, steps=2),
        lambda m, ids: SoftSufficiency(m).update(ids, torch.rand(ids.shape)),
    ],
)
@pytest.mark.parametrize("bad", [OUT_OF_VOCAB, torch.tensor([3, -1, 4]), OUT_OF_VOCAB[None]])
def test_token_ids_outside_the_vocabulary_name_input_ids(model, call, bad):
    with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, {VOCAB}\)"):
        call(model, bad)


def test_output_ids_and_target_ids_are_checked_against_the_vocabulary(model):
    with pytest.raises(ValueError, match="output_ids"):
        jvp_attribution(model, IDS, torch.tensor([VOCAB + 3]))
    with pytest.raises(ValueError, match="target_id"):
        reagent_attribution(model, IDS, target_id=VOCAB, max_probe_steps=2, keep_top_n=1)
    with pytest.raises(ValueError, match="target_id"):
        gradient_x_input(model, IDS, target_id=VOCAB)
    with pytest.raises(TypeError, match="target_id"):
        gradient_x_input(model, IDS, target_id=2.5)
    with pytest.raises(TypeError, match="target_ids"):
        SoftSufficiency(model).update(IDS, torch.rand(6), torch.tensor([2.7]))


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (IDS.float(), TypeError, "input_ids"),
        (IDS.bool(), TypeError, "input_ids"),
        (torch.tensor(3), ValueError, "input_ids"),
        (torch.tensor([], dtype=torch.long), ValueError, "input_ids"),
        (torch.stack([IDS, IDS]), ValueError, "input_ids"),
        ([3, 4, 5], TypeError, "input_ids"),
    ],
)
def test_input_ids_of_the_wrong_kind(model, ids, error, match):
    with pytest.raises(error, match=match):
        reagent_attribution(model, ids, max_probe_steps=2, keep_top_n=1)
    with pytest.raises(error, match=match):
        jvp_attribution(model, ids, torch.tensor([3]))


# ---- hyperparameters and other arguments --------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"replacing_ratio": float("nan")}, ValueError, "replacing_ratio"),
        ({"replacing_ratio": 1.0}, ValueError, "replacing_ratio"),
        ({"replacing_ratio": "0.3"}, TypeError, "replacing_ratio"),
        ({"max_probe_steps": 0}, ValueError, "max_probe_steps"),
        ({"max_probe_steps": float("inf")}, TypeError, "max_probe_steps"),
        ({"num_probes": -1}, ValueError, "num_probes"),
        ({"keep_top_n": 6}, ValueError, "keep_top_n"),
        ({"stopping_top_k": 0}, ValueError, "stopping_top_k"),
        ({"sampler": "pos"}, ValueError, "sampler"),
        ({"sampler": 3}, TypeError, "sampler"),
        ({"generator": 0}, TypeError, "generator"),
        ({"return_details": "yes"}, TypeError, "return_details"),
        ({"target_id": -1}, ValueError, "target_id"),
        ({"exclude_ids": range(VOCAB)}, ValueError, "exclude_ids"),
    ],
)
def test_reagent_options(model, options, error, match):
    with pytest.raises(error, match=match):
        reagent_attribution(model, IDS, **{"max_probe_steps": 2, "keep_top_n": 2, **options})


def test_a_sampler_returning_ids_outside_the_vocabulary_is_refused(model):
    def bad_sampler(ids, mask, generator):
        return torch.full_like(ids, VOCAB + 5)

    with pytest.raises(ValueError, match="sampler"):
        reagent_attribution(model, IDS, sampler=bad_sampler, max_probe_steps=2, keep_top_n=2)


def test_models_that_are_not_callable(model):
    for call in (
        lambda: reagent_attribution("gpt2", IDS),
        lambda: jvp_attribution(None, IDS, IDS),
        lambda: gradient_x_input(3, IDS),
        lambda: SoftSufficiency("gpt2"),
        lambda: LanguageModelTokenSampler("gpt2"),
    ):
        with pytest.raises(TypeError, match="model"):
            call()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "adjoint"}, ValueError, "method"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"positions": [0.5]}, TypeError, "positions"),
        ({"positions": torch.tensor([0.0])}, TypeError, "positions"),
        ({"positions": [9]}, ValueError, "positions"),
        ({"positions": []}, ValueError, "positions"),
        ({"positions": "0"}, TypeError, "positions"),
    ],
)
def test_jvp_attribution_options(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        jvp_attribution(model, IDS, torch.tensor([3]), **kwargs)


@pytest.mark.parametrize(
    "attribution, kwargs, error, match",
    [
        (torch.tensor([[1.0, float("nan")]]), {}, ValueError, "attribution"),
        (torch.tensor([[1.0, float("inf")]]), {}, ValueError, "attribution"),
        (torch.zeros(0, 3), {}, ValueError, "attribution"),
        (torch.tensor(1.0), {}, ValueError, "attribution"),
        ([[1.0]], {}, ValueError, "attribution"),
        (torch.rand(2, 3), {"L": 0}, ValueError, "L"),
        (torch.rand(2, 3), {"L": 2.5}, TypeError, "L"),
        (torch.rand(2, 3), {"b": -1}, ValueError, "b"),
        (torch.rand(2, 3), {"p": 1.0}, ValueError, "p"),
        (torch.rand(2, 3), {"p": float("nan")}, ValueError, "p"),
        (torch.rand(2, 3), {"p": float("inf")}, ValueError, "p"),
    ],
)
def test_importance_density_bad_input(attribution, kwargs, error, match):
    with pytest.raises(error, match=match):
        importance_density(attribution, **kwargs)


def test_instruction_score_bad_input():
    with pytest.raises(TypeError, match="density"):
        instruction_score([1.0, 0.5], torch.tensor([True, False]))
    with pytest.raises(ValueError, match="density"):
        instruction_score(torch.tensor([float("nan"), 0.5]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="instruction_mask"):
        instruction_score(torch.rand(3), torch.tensor([True, False]))


def test_samplers_bad_input(model):
    with pytest.raises(ValueError, match="vocab_size"):
        UniformTokenSampler(1)
    with pytest.raises(TypeError, match="vocab_size"):
        UniformTokenSampler(10.0)
    with pytest.raises(ValueError, match="exclude_ids"):
        UniformTokenSampler(3, exclude_ids=[0, 1, 2])
    with pytest.raises(TypeError, match="corpus_ids"):
        FrequencyTokenSampler(torch.tensor([1.5, 2.0]), 10)
    with pytest.raises(ValueError, match="corpus_ids"):
        FrequencyTokenSampler(torch.tensor([1, 12]), 10)
    with pytest.raises(ValueError, match="smoothing"):
        FrequencyTokenSampler(torch.tensor([1, 2]), 10, smoothing=-1.0)
    with pytest.raises(ValueError, match="smoothing"):
        FrequencyTokenSampler(torch.tensor([1, 2]), 10, smoothing=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        LanguageModelTokenSampler(model, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        LanguageModelTokenSampler(model, temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k"):
        LanguageModelTokenSampler(model, top_k=0)


def test_metrics_bad_input(model):
    with pytest.raises(ValueError, match="num_samples"):
        SoftSufficiency(model, num_samples=0)
    with pytest.raises(ValueError, match="normalization"):
        SoftSufficiency(model, normalization="softmax")
    with pytest.raises(TypeError, match="seed"):
        SoftSufficiency(model, seed="0")
    with pytest.raises(ValueError, match="ratio"):
        Sufficiency(model, ratio=0.0)
    with pytest.raises(ValueError, match="ratio"):
        Sufficiency(model, ratio=float("nan"))
    with pytest.raises(ValueError, match="top_k"):
        Sufficiency(model, top_k=0)
    metric = SoftSufficiency(model)
    with pytest.raises(ValueError, match="importance"):
        metric.update(IDS, torch.tensor([1.0, float("nan"), 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="importance"):
        metric.update(IDS, torch.rand(5))
    with pytest.raises(TypeError, match="input_ids"):
        metric.update(IDS.float(), torch.rand(6))
    with pytest.raises(ValueError, match="input_ids"):
        metric.update(torch.zeros(1, 0, dtype=torch.long), torch.rand(1, 0))
    with pytest.raises(ValueError, match="target_ids"):
        metric.update(IDS, torch.rand(6), VOCAB)
    assert int(metric.count) == 0  # failed updates leave the state alone


def test_random_attribution_bad_input():
    with pytest.raises(TypeError, match="generator"):
        random_attribution(IDS, generator=0)
    with pytest.raises(TypeError, match="input_ids"):
        random_attribution([1, 2])


def test_callback_bad_input():
    pytest.importorskip("lightning")
    from lightning_bpfree.attribution import ReAGentCallback

    prompt = torch.tensor([3, 4, 5])
    for kwargs, error, match in [
        ({"prompts": []}, ValueError, "prompts"),
        ({"prompts": "hello"}, ValueError, "prompts"),
        ({"prompts": [3.5]}, TypeError, "prompts"),
        ({"prompts": [prompt.float()]}, TypeError, "prompts"),
        ({"prompts": ["text"]}, ValueError, "tokenizer"),
        ({"prompts": [prompt], "every_n_epochs": 0}, ValueError, "every_n_epochs"),
        ({"prompts": [prompt], "seed": -1}, ValueError, "seed"),
        ({"prompts": [prompt], "faithfulness": "no"}, TypeError, "faithfulness"),
        ({"prompts": [prompt], "model_attr": 3}, TypeError, "model_attr"),
        ({"prompts": [prompt], "num_probe": 4}, TypeError, "num_probe"),
        ({"prompts": [prompt], "return_details": False}, TypeError, "return_details"),
    ]:
        with pytest.raises(error, match=match):
            ReAGentCallback(**kwargs)
