"""ReAGent: determinism, planted rationales, a trained key-value retrieval LM, samplers, bad inputs."""

import pytest
import torch
from torch import nn

from lightning_bpfree.attribution import (
    FrequencyTokenSampler,
    LanguageModelTokenSampler,
    UniformTokenSampler,
    reagent_attribution,
)
from lightning_bpfree.attribution.retrieval_task import PAIRS, retrieval_batch, train_retrieval_model
from lightning_bpfree.models import tiny_causal_lm


class Planted(nn.Module):
    """Predicts ``(x[position] + 1) mod V`` with high confidence: only that token matters."""

    def __init__(self, vocab: int = 50, position: int = 3) -> None:
        super().__init__()
        self.vocab, self.position = vocab, position

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        answer = (input_ids[:, self.position] + 1) % self.vocab
        logits[torch.arange(input_ids.shape[0]), :, answer] = 8.0
        return logits


def test_same_generator_seed_repeats_exactly_and_another_seed_differs():
    model = tiny_causal_lm("llama", vocab_size=40, hidden_size=16)
    ids = torch.randint(3, 40, (9,), generator=torch.Generator().manual_seed(0))
    options = dict(num_probes=4, max_probe_steps=10, keep_top_n=3)
    first = reagent_attribution(model, ids, generator=torch.Generator().manual_seed(7), **options)
    second = reagent_attribution(model, ids, generator=torch.Generator().manual_seed(7), **options)
    other = reagent_attribution(model, ids, generator=torch.Generator().manual_seed(8), **options)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert first.shape == (9,) and float(first.sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("position", [0, 3, 10])
def test_finds_the_planted_token(position):
    model = Planted(position=position)
    hits = 0
    for seed in range(5):
        ids = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(seed))
        result = reagent_attribution(model, ids, generator=torch.Generator().manual_seed(seed), return_details=True)
        assert bool(result.converged.all())
        assert result.target_id == (int(ids[position]) + 1) % 50
        hits += int(result.importance.argmax()) == position
    assert hits == 5


def test_a_plain_function_is_enough():
    planted = Planted(position=2)
    ids = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(1))
    importance = reagent_attribution(
        lambda x: planted(x), ids, keep_top_n=2, generator=torch.Generator().manual_seed(0)
    )
    assert int(importance.argmax()) == 2


@pytest.fixture(scope="module")
def retrieval_model():
    return train_retrieval_model(seed=0)  # the same call as the benchmark: one training per process


def test_ranks_the_answer_bearing_token_first_on_a_trained_retrieval_model(retrieval_model):
    ids, answers, asked = retrieval_batch(512, torch.Generator().manual_seed(2))
    with torch.no_grad():
        accuracy = float((retrieval_model(ids).logits[:, -1].argmax(-1) == answers).float().mean())
    assert accuracy > 0.95  # the model really retrieves, so the answer-bearing token is known
    prompts, hits, random_hits = 20, 0, 0
    for i in range(prompts):
        importance = reagent_attribution(
            retrieval_model, ids[i], keep_top_n=2, stopping_top_k=1, num_probes=16,
            generator=torch.Generator().manual_seed(i),
        )  # fmt: skip
        # The query token (last) is necessary too; rank among the context the answer could come from.
        hits += int(importance[:PAIRS].argmax()) == int(asked[i])
        random_hits += int(torch.rand(PAIRS, generator=torch.Generator().manual_seed(i)).argmax()) == int(asked[i])
    assert hits >= 0.8 * prompts
    assert hits > random_hits + 0.4 * prompts


def test_uniform_sampler_never_proposes_excluded_ids():
    sampler = UniformTokenSampler(10, exclude_ids=[0, 1, 2])
    draws = sampler(torch.zeros(50, 40, dtype=torch.long), torch.ones(50, 40, dtype=torch.bool), torch.Generator())
    assert set(draws.unique().tolist()) == set(range(3, 10))


def test_frequency_sampler_follows_corpus_frequencies():
    corpus = torch.tensor([5] * 60 + [6] * 30 + [7] * 10 + [0] * 100)
    sampler = FrequencyTokenSampler(corpus, vocab_size=10, exclude_ids=[0])
    draws = sampler(torch.zeros(100, 100, dtype=torch.long), None, torch.Generator().manual_seed(0))
    shares = torch.bincount(draws.flatten(), minlength=10).float() / draws.numel()
    torch.testing.assert_close(shares[[5, 6, 7]], torch.tensor([0.6, 0.3, 0.1]), atol=0.02, rtol=0)
    assert float(shares[[0, 1, 2, 3, 4, 8, 9]].sum()) == 0.0


def test_language_model_sampler_uses_each_positions_left_context():
    class NextIsPlusOne(nn.Module):
        def forward(self, input_ids):
            return nn.functional.one_hot((input_ids + 1) % 20, 20).float() * 50.0

    sampler = LanguageModelTokenSampler(NextIsPlusOne())
    ids = torch.tensor([4, 9, 13, 2]).expand(6, 4)
    draws = sampler(ids, torch.ones(6, 4, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert torch.equal(draws[:, 1:], torch.tensor([5, 10, 14]).expand(6, 3))
    assert set(draws[:, 0].tolist()) <= {5, 10, 14}  # position 0: the mean of the other proposals


@pytest.mark.parametrize("make_sampler", ["frequency", "language-model"])
def test_other_samplers_also_find_the_planted_token(make_sampler):
    model = Planted(position=4)
    ids = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(3))
    if make_sampler == "frequency":
        sampler = FrequencyTokenSampler(torch.arange(50).repeat(3), vocab_size=50)
    else:
        sampler = LanguageModelTokenSampler(tiny_causal_lm("llama", vocab_size=50, hidden_size=16))
    importance = reagent_attribution(model, ids, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert int(importance.argmax()) == 4


def test_warns_when_no_probe_stops():
    original = torch.arange(3, 11)

    class OnlyTheExactInput(nn.Module):
        def forward(self, input_ids):
            exact = (input_ids == original).all(-1)
            return nn.functional.one_hot(torch.where(exact, 1, 2), 30).float()[:, None].expand(-1, 8, -1) * 9

    with pytest.warns(RuntimeWarning, match="no ReAGent probe"):
        result = reagent_attribution(
            OnlyTheExactInput(), original, keep_top_n=2, stopping_top_k=1, max_probe_steps=4,
            num_probes=3, generator=torch.Generator().manual_seed(0), return_details=True,
        )  # fmt: skip
    assert not bool(result.converged.any()) and result.probe_steps.tolist() == [4, 4, 4]
    assert float(result.importance.sum()) == pytest.approx(1.0, abs=1e-5)


def test_bad_inputs_raise_clearly():
    model = Planted()
    ids = torch.arange(8)
    with pytest.raises(ValueError, match="keep_top_n"):
        reagent_attribution(model, ids, keep_top_n=8)
    with pytest.raises(ValueError, match="replacing_ratio"):
        reagent_attribution(model, ids, replacing_ratio=0.0)
    with pytest.raises(ValueError, match="target_id"):
        reagent_attribution(model, ids, target_id=50)
    with pytest.raises(ValueError, match=r"\[N\] or \[1, N\]"):
        reagent_attribution(model, ids.view(2, 4))
    with pytest.raises(ValueError, match="sampler"):
        reagent_attribution(model, ids, sampler="postag")
    with pytest.raises(ValueError, match="num_probes"):
        reagent_attribution(model, ids, num_probes=0)
    with pytest.raises(ValueError, match="exclude_ids"):
        UniformTokenSampler(3, exclude_ids=[0, 1, 2])
