"""Faithfulness metrics against hand-computed values."""

import pytest
import torch
from torch import nn

from lightning_bpfree.attribution import (
    Comprehensiveness,
    SoftComprehensiveness,
    SoftSufficiency,
    Sufficiency,
    normalized_comprehensiveness,
    normalized_sufficiency,
)
from lightning_bpfree.models import tiny_causal_lm


class BagOfEmbeddings(nn.Module):
    """Next-token logits = W^T (sum of the embeddings so far): removal effects are easy to compute by hand."""

    def __init__(self, vocab: int = 12, dim: int = 6) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.embed.weight.data = torch.randn(vocab, dim, generator=generator)
        self.out = nn.Parameter(torch.randn(dim, vocab, generator=generator))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return embeds.cumsum(dim=1) @ self.out

    def prob(self, ids, kept, target):
        return float(torch.softmax(self.embed.weight[ids[kept]].sum(0) @ self.out, -1)[target])


def test_normalized_scores_by_hand():
    full, empty = torch.tensor([0.8, 0.8, 0.3]), torch.tensor([0.2, 0.2, 0.5])
    # S = 1 - max(0, 0.8 - 0.6) = 0.8, S0 = 1 - 0.6 = 0.4 -> (0.8 - 0.4) / 0.6; kept above full -> S = 1 -> 1.
    ns = normalized_sufficiency(full, torch.tensor([0.6, 0.9, 0.3]), empty)
    torch.testing.assert_close(ns[:2], torch.tensor([0.4 / 0.6, 1.0]))
    assert torch.isnan(ns[2])  # the prediction does not drop on the empty input: no scale
    nc = normalized_comprehensiveness(full, torch.tensor([0.5, 0.9, 0.1]), empty)
    torch.testing.assert_close(nc[:2], torch.tensor([0.3 / 0.6, 0.0]))
    assert torch.isnan(nc[2])


def test_hard_metrics_equal_hand_computation():
    model = BagOfEmbeddings()
    ids = torch.tensor([[3, 7, 1, 9, 4]])
    importance = torch.tensor([[0.9, 0.1, 0.3, 0.8, -0.2]])  # top-2: positions 0 and 3
    with torch.no_grad():
        target = int(model(ids)[0, -1].argmax())
        everything = [0, 1, 2, 3, 4]
        full = model.prob(ids[0], everything, target)
        empty = float(torch.softmax(torch.zeros(12), -1)[target])
        kept = model.prob(ids[0], [0, 3], target)
        removed = model.prob(ids[0], [1, 2, 4], target)
    s0 = 1 - max(0.0, full - empty)
    expected_ns = max(0.0, (1 - max(0.0, full - kept)) - s0) / (1 - s0)
    expected_nc = max(0.0, full - removed) / (1 - s0)
    assert 0 < expected_nc < 1 and 0 < expected_ns < 1  # no clamp is active: the formulas themselves count
    sufficiency, comprehensiveness = Sufficiency(model, top_k=2), Comprehensiveness(model, top_k=2)
    sufficiency.update(ids, importance)
    comprehensiveness.update(ids, importance, target)
    assert float(sufficiency.compute()) == pytest.approx(expected_ns, abs=1e-6)
    assert float(comprehensiveness.compute()) == pytest.approx(expected_nc, abs=1e-6)
    # Binary importance makes the soft masks deterministic: soft and hard then agree exactly.
    binary = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0]])
    soft_ns, soft_nc = SoftSufficiency(model), SoftComprehensiveness(model)
    soft_ns.update(ids, binary)
    soft_nc.update(ids, binary)
    assert float(soft_ns.compute()) == pytest.approx(expected_ns, abs=1e-6)
    assert float(soft_nc.compute()) == pytest.approx(expected_nc, abs=1e-6)


def test_soft_masks_keep_elements_with_the_importance_probability():
    model = BagOfEmbeddings(vocab=12, dim=4000)  # many elements: the kept share is close to its expectation
    ids = torch.tensor([2, 5, 8])
    importance = torch.tensor([1.0, 0.25, 0.0])
    from lightning_bpfree.attribution.metrics import keep_probabilities, masked_target_probability

    keep = keep_probabilities(importance[None])
    torch.testing.assert_close(keep, torch.tensor([[1.0, 0.25, 0.0]]))
    ranked = keep_probabilities(torch.tensor([[0.3, -2.0, 5.0, 0.3]]), "rank")
    torch.testing.assert_close(ranked, torch.tensor([[3 / 4, 1 / 4, 4 / 4, 2 / 4]]))  # ties: lower index first
    captured = {}
    original = model.forward

    def spy(input_ids=None, inputs_embeds=None):
        if inputs_embeds is not None:
            captured["embeds"] = inputs_embeds
        return original(input_ids, inputs_embeds)

    model.forward = spy
    masked_target_probability(model, ids[None], torch.tensor([0]), keep, torch.Generator().manual_seed(0))
    survived = (captured["embeds"][0] != 0).float().mean(-1)
    assert float(survived[0]) == 1.0 and float(survived[2]) == 0.0
    assert abs(float(survived[1]) - 0.25) < 0.03


def test_metrics_average_over_updates_reset_and_repeat_with_a_seed():
    model = tiny_causal_lm("llama", vocab_size=40, hidden_size=16, seed=4)
    ids = torch.randint(3, 40, (3, 7), generator=torch.Generator().manual_seed(0))
    importance = torch.rand(3, 7, generator=torch.Generator().manual_seed(1))
    whole = SoftSufficiency(model, num_samples=2, seed=5)
    whole.update(ids, importance)
    # The score is the mean over examples, however the updates are split.
    batched, one_by_one, parts = Comprehensiveness(model, top_k=2), Comprehensiveness(model, top_k=2), []
    batched.update(ids, importance)
    for row in range(3):
        one_by_one.update(ids[row], importance[row])
        single = Comprehensiveness(model, top_k=2)
        single.update(ids[row], importance[row])
        parts.append(float(single.compute()))
    assert float(batched.compute()) == pytest.approx(sum(parts) / 3, abs=1e-6)
    assert float(one_by_one.compute()) == pytest.approx(sum(parts) / 3, abs=1e-6)
    again = SoftSufficiency(model, num_samples=2, seed=5)
    again.update(ids, importance)
    assert float(whole.compute()) == float(again.compute())
    assert 0.0 <= float(whole.compute()) <= 1.0
    # Keeping everything is fully sufficient; removing everything is fully comprehensive.
    everything = torch.ones(3, 7)
    keep_all, drop_all = Sufficiency(model, top_k=7), Comprehensiveness(model, top_k=7)
    keep_all.update(ids, everything)
    drop_all.update(ids, everything)
    assert float(keep_all.compute()) == pytest.approx(1.0) and float(drop_all.compute()) == pytest.approx(1.0)
    keep_all.reset()
    assert int(keep_all.count) == 0 and torch.isnan(keep_all.compute())
    assert not any("embed" in key for key in whole.state_dict())  # the model's weights are not metric state


def test_examples_without_scale_are_skipped_not_averaged():
    class Constant(BagOfEmbeddings):
        def forward(self, input_ids=None, inputs_embeds=None):
            embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
            return torch.zeros(*embeds.shape[:2], 12)

    metric = SoftComprehensiveness(Constant())
    metric.update(torch.tensor([1, 2, 3]), torch.tensor([0.2, 0.5, 0.1]))
    assert int(metric.num_skipped) == 1 and int(metric.count) == 0 and torch.isnan(metric.compute())


def test_bad_inputs_raise_clearly():
    model = BagOfEmbeddings()
    metric = SoftSufficiency(model)
    with pytest.raises(ValueError, match="one score per input token"):
        metric.update(torch.tensor([1, 2, 3]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.tensor([1, 2, 3]), torch.tensor([0.1, float("nan"), 0.2]))
    with pytest.raises(ValueError, match="target_ids"):
        metric.update(torch.tensor([1, 2, 3]), torch.tensor([0.1, 0.3, 0.2]), target_ids=99)
    with pytest.raises(TypeError, match="integer"):
        metric.update(torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.3]))
    with pytest.raises(ValueError, match="num_samples"):
        SoftSufficiency(model, num_samples=0)
    with pytest.raises(ValueError, match="normalization"):
        SoftComprehensiveness(model, normalization="softmax")
    with pytest.raises(ValueError, match="top_k"):
        Sufficiency(model, top_k=0)
    with pytest.raises(ValueError, match="ratio"):
        Comprehensiveness(model, ratio=1.5)


def test_soft_faithfulness_is_both_soft_metrics_on_one_explanation():
    from lightning_bpfree.attribution.metrics import soft_faithfulness

    model = BagOfEmbeddings()
    ids, importance = torch.tensor([1, 5, 7, 2]), torch.tensor([0.1, 0.6, 0.2, 0.4])
    scores = soft_faithfulness(model, ids, importance, 3, seed=7, num_samples=2)
    for key, metric_class in (("soft_ns", SoftSufficiency), ("soft_nc", SoftComprehensiveness)):
        metric = metric_class(model, seed=7, num_samples=2)
        metric.update(ids, importance, 3)
        assert scores[key] == pytest.approx(float(metric.compute()), nan_ok=True)
