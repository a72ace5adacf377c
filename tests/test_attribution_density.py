"""jvp_attribution against back-propagation and finite differences; importance density by hand."""

import math

import pytest
import torch

from lightning_bpfree.attribution import importance_density, instruction_score, jvp_attribution
from lightning_bpfree.attribution.baselines import gradient_x_input, integrated_gradients
from lightning_bpfree.models import tiny_causal_lm


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_jvp_equals_backward(arch):
    model = tiny_causal_lm(arch, vocab_size=64, hidden_size=32, seed=1)
    prompt = torch.randint(3, 64, (9,), generator=torch.Generator().manual_seed(0))
    response = torch.randint(3, 64, (4,), generator=torch.Generator().manual_seed(1))
    forward = jvp_attribution(model, prompt, response, method="jvp")
    backward = jvp_attribution(model, prompt, response, method="backward")
    assert forward.shape == (4, 9)
    assert float(forward.abs().max()) > 1e-5  # a non-trivial matrix, so the comparison below means something
    torch.testing.assert_close(forward, backward, atol=1e-5, rtol=1e-4)
    assert float((forward - backward).abs().max() / forward.abs().max()) < 1e-4


def test_jvp_matches_central_differences_in_float64():
    # GPT-2's LayerNorm stays in float64 (LLaMA's RMSNorm rounds through float32, too coarse for this check).
    model = tiny_causal_lm("gpt2", vocab_size=48, hidden_size=16, seed=2).double()
    prompt, response = torch.tensor([5, 9, 17, 30, 4]), torch.tensor([11, 7])
    attribution = jvp_attribution(model, prompt, response).double()
    sequence = torch.cat([prompt, response[:-1]])
    embeds = model.get_input_embeddings()(sequence[None]).detach()

    def probability(m: int, scaled: torch.Tensor) -> float:
        logits = model(inputs_embeds=scaled).logits[0, prompt.numel() - 1 + m]
        return float(torch.softmax(logits, -1)[response[m]])

    h = 1e-5
    with torch.no_grad():
        for m in range(2):
            for n in (0, 2, 4):
                up, down = embeds.clone(), embeds.clone()
                up[0, n] *= 1 + h
                down[0, n] *= 1 - h
                numeric = (probability(m, up) - probability(m, down)) / (2 * h)
                assert abs(numeric - float(attribution[m, n])) < 1e-9 + 1e-5 * abs(numeric)


@pytest.mark.parametrize("method", ["jvp", "backward"])
def test_log_probability_target_equals_autograd_and_probability_over_p(method):
    model = tiny_causal_lm("gpt2", vocab_size=48, hidden_size=16, seed=4).double()
    prompt, response = torch.tensor([5, 9, 17, 30, 4, 22]), torch.tensor([11, 7, 40])
    log_attribution = jvp_attribution(model, prompt, response, method=method, target="log_probability").double()
    prob_attribution = jvp_attribution(model, prompt, response, method=method, target="probability").double()
    # Independent reference: reverse-mode gradient of log p(y_m), written out here, dotted with the embeddings.
    sequence = torch.cat([prompt, response[:-1]])
    embeds = model.get_input_embeddings()(sequence[None]).detach().requires_grad_(True)
    log_probs = torch.log_softmax(model(inputs_embeds=embeds).logits[0], -1)
    for m in range(response.numel()):
        log_p = log_probs[prompt.numel() - 1 + m, response[m]]
        (grad,) = torch.autograd.grad(log_p, embeds, retain_graph=True)
        expected = (grad[0, : prompt.numel()] * embeds[0, : prompt.numel()]).sum(-1).detach()
        assert float(expected.abs().max()) > 1e-4  # non-trivial, so the comparisons mean something
        # float32 output: compare at float32 resolution of the largest entry.
        torch.testing.assert_close(log_attribution[m], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        # Captum's input x gradient on log p is the probability attribution divided by p.
        torch.testing.assert_close(log_attribution[m], prob_attribution[m] / log_p.exp().detach(), rtol=1e-5, atol=1e-9)


def test_unknown_attribution_target_is_refused():
    model = tiny_causal_lm("gpt2", vocab_size=32, hidden_size=16)
    with pytest.raises(ValueError, match="target"):
        jvp_attribution(model, torch.tensor([3, 4, 5]), torch.tensor([6]), target="logit")


def test_positions_and_chunks_give_the_same_columns():
    model = tiny_causal_lm("gpt2", vocab_size=64, hidden_size=32)
    prompt, response = torch.arange(3, 13), torch.tensor([20, 21, 22])
    full = jvp_attribution(model, prompt, response)
    some = jvp_attribution(model, prompt[None], response, positions=[1, 4, 8], chunk_size=2)
    torch.testing.assert_close(some[:, [1, 4, 8]], full[:, [1, 4, 8]], atol=1e-7, rtol=1e-6)
    assert float(some[:, [0, 2, 3, 5, 6, 7, 9]].abs().max()) == 0.0


def test_jvp_restores_training_mode():
    model = tiny_causal_lm("llama", vocab_size=32, hidden_size=16).train()
    jvp_attribution(model, torch.tensor([3, 4, 5]), torch.tensor([6]))
    assert model.training


def test_gradient_x_input_is_one_row_and_integrated_gradients_completes():
    model = tiny_causal_lm("llama", vocab_size=64, hidden_size=32, seed=3)
    prompt = torch.tensor([4, 8, 15, 16, 23, 42])
    target = int(model(prompt[None]).logits[0, -1].argmax())
    torch.testing.assert_close(
        gradient_x_input(model, prompt), jvp_attribution(model, prompt, torch.tensor([target]), method="backward")[0]
    )
    # Completeness: integrated gradients sum to p(x) - p(zero input), up to the Riemann error (RMSNorm makes
    # the integrand steep near the zero baseline, hence the loose tolerance; a sign or scale bug is far off).
    ig = integrated_gradients(model, prompt, steps=128)
    embeds = model.get_input_embeddings()(prompt[None]).detach()
    with torch.no_grad():
        p_full = torch.softmax(model(inputs_embeds=embeds).logits[0, -1], -1)[target]
        p_zero = torch.softmax(model(inputs_embeds=torch.zeros_like(embeds)).logits[0, -1], -1)[target]
    assert abs(float(ig.sum()) - float(p_full - p_zero)) < 0.1 * abs(float(p_full - p_zero))


def test_importance_density_by_hand():
    attribution = torch.tensor([[1.0, 0.75, 0.2, -1.0], [0.5, 2.0, 1.7, 0.0]])
    # Row 0 /1 -> buckets [10, 8, 2, 0] -> [10, 8, 0, 0]; row 1 /2 -> [0.25, 1, 0.85, 0] -> [3, 10, 9, 0] -> [0, 10, 9, 0].
    ratios = torch.tensor([10 / 10, 18 / (8**4 + 10**4) ** 0.25, 9 / 9, 0.0])
    torch.testing.assert_close(importance_density(attribution), ratios / ratios.max())
    # Each response row is scaled by its own maximum, so positive row scales change nothing.
    torch.testing.assert_close(importance_density(attribution * torch.tensor([[3.0], [0.01]])), ratios / ratios.max())
    # b=0 keeps every positive bucket: token 2 now counts for both rows.
    token2 = (2 + 9) / (2**4 + 9**4) ** 0.25
    assert float(importance_density(attribution, b=0)[2]) == pytest.approx(
        token2 / max(1.0, 18 / (8**4 + 10**4) ** 0.25, token2, (3 + 10) / (3**4 + 10**4) ** 0.25), rel=1e-6
    )


def test_importance_density_of_all_negative_attribution_is_zero():
    assert float(importance_density(-torch.rand(3, 5)).abs().max()) == 0.0


def test_instruction_score_by_hand():
    density = torch.tensor([1.0, 0.5, 0.25, 0.0])
    mask = torch.tensor([True, True, False, False])
    assert instruction_score(density, mask) == pytest.approx(1.5 / math.log2(4))


def test_bad_inputs_raise_clearly():
    model = tiny_causal_lm("llama", vocab_size=32, hidden_size=16)
    ids = torch.tensor([3, 4, 5])
    with pytest.raises(ValueError, match="method"):
        jvp_attribution(model, ids, ids, method="adjoint")
    with pytest.raises(TypeError, match="integer token ids"):
        jvp_attribution(model, ids.float(), ids)
    with pytest.raises(ValueError, match=r"\[N\] or \[1, N\]"):
        jvp_attribution(model, torch.stack([ids, ids]), ids)
    with pytest.raises(ValueError, match="positions"):
        jvp_attribution(model, ids, ids, positions=[3])
    with pytest.raises(ValueError, match="2-D"):
        importance_density(torch.rand(4))
    with pytest.raises(ValueError, match="b must be"):
        importance_density(torch.rand(2, 3), L=10, b=10)
    with pytest.raises(TypeError, match="bool"):
        instruction_score(torch.rand(3), torch.tensor([1, 0, 0]))
    with pytest.raises(TypeError, match="get_input_embeddings"):
        jvp_attribution(lambda ids: ids, ids, ids)
