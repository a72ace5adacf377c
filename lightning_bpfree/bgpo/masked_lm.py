"""A masked-diffusion language model around any bidirectional transformers encoder with an MLM head.

The model follows LLaDA's absorbing-state process on the *response* part of a sequence: the prompt
stays clean, ``k`` of the ``L`` response tokens are replaced by the mask token, and the encoder
predicts the originals. Three operations are exposed:

- :meth:`MaskedDiffusionLM.forward_mask`: the forward (noising) process for given mask counts.
- :meth:`MaskedDiffusionLM.elbo`: the Monte Carlo ELBO term of one mask draw,
  ``-(L / k) * sum_masked CE`` (nats; divided by ``L`` when ``per_token=True``), the quantity whose
  ratio BGPO optimises and whose negative mean is the supervised masked-diffusion loss.
- :meth:`MaskedDiffusionLM.generate`: reverse process with low-confidence remasking (start fully
  masked, at each step commit the most confident predictions, keep the rest masked).

Plain PyTorch; no Lightning import.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_bpfree.validation import check_int, check_nonnegative_float, check_positive_int, check_token_ids


class MaskedDiffusionLM(nn.Module):
    """Masked-diffusion LM over ``encoder``, a transformers model whose output has ``.logits`` (B, T, V).

    Args:
        encoder: a bidirectional encoder with a language-model head, e.g. ``BertForMaskedLM`` (not a
            causal decoder: ``config.is_decoder`` must be false). Dropout should be 0 so that the
            ELBO of the same mask draw is a deterministic function of the weights (BGPO's ratio at
            ``theta = theta_old`` is then exactly 1).
        mask_token_id: id of the absorbing mask token in the encoder's vocabulary.
    """

    def __init__(self, encoder: nn.Module, mask_token_id: int) -> None:
        super().__init__()
        config = getattr(encoder, "config", None)
        if config is not None and getattr(config, "is_decoder", False):
            raise ValueError("encoder must be bidirectional (config.is_decoder=False); got a causal decoder")
        vocab_size = getattr(config, "vocab_size", None)
        check_int("mask_token_id", mask_token_id, low=0)
        if vocab_size is not None and mask_token_id >= vocab_size:
            raise ValueError(f"mask_token_id={mask_token_id} is outside the vocabulary (size {vocab_size})")
        self.encoder = encoder
        self.mask_token_id = mask_token_id
        self.vocab_size: int | None = vocab_size  # None when the encoder does not say (ids then unchecked)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits (B, T, V) of the encoder on ``input_ids`` (B, T)."""
        check_token_ids("input_ids", input_ids, self.vocab_size)
        return self.encoder(input_ids=input_ids).logits

    # ------------------------------------------------------------------ forward process

    def forward_mask(
        self,
        input_ids: Tensor,
        response_mask: Tensor,
        mask_counts: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Which tokens the forward process masks: a bool (B, T) tensor.

        For each row ``b``, exactly ``mask_counts[b]`` of its response positions (``response_mask[b]``
        true) are chosen uniformly at random without replacement; prompt positions are never masked.

        Args:
            input_ids: (B, T) token ids (only the shape and device are used).
            response_mask: (B, T) bool, true on response tokens.
            mask_counts: (B,) integers in ``[0, response length]``.
        """
        _check_batch(input_ids, response_mask)
        lengths = response_mask.sum(dim=1)
        mask_counts = torch.as_tensor(mask_counts, device=input_ids.device)
        if mask_counts.shape != lengths.shape:
            raise ValueError(f"mask_counts must have shape {tuple(lengths.shape)}, got {tuple(mask_counts.shape)}")
        if bool((mask_counts < 0).any()) or bool((mask_counts > lengths).any()):
            raise ValueError("mask_counts must lie in [0, number of response tokens] for every row")
        scores = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        scores = scores.masked_fill(~response_mask, 2.0)  # prompt positions rank last
        ranks = scores.argsort(dim=1).argsort(dim=1)
        return ranks < mask_counts[:, None]

    def elbo(
        self,
        input_ids: Tensor,
        response_mask: Tensor,
        masked: Tensor,
        per_token: bool = True,
        extra_masked: Tensor | None = None,
    ) -> Tensor:
        """One Monte Carlo term of the ELBO of each response, shape (B,), in nats.

        ``-(L / k) * sum_{masked i} CE(logits_i, input_ids_i)`` with ``L`` the response length and
        ``k`` the number of masked response tokens (``L / k`` is ``1 / p_mask``); divided by ``L``
        when ``per_token`` (the normalisation BGPO's reference code uses). Rows with ``k = 0`` get 0.
        Differentiable in the encoder's weights.

        Args:
            input_ids: (B, T) clean token ids.
            response_mask: (B, T) bool, true on response tokens.
            masked: (B, T) bool from :meth:`forward_mask` (response positions to corrupt).
            extra_masked: optional (B, T) bool of further (prompt) positions to corrupt without
                scoring them.
        """
        _check_batch(input_ids, response_mask)
        if masked.shape != input_ids.shape or masked.dtype != torch.bool:
            raise ValueError("masked must be a bool tensor with the shape of input_ids")
        masked = masked & response_mask
        corrupt = masked if extra_masked is None else masked | extra_masked
        noisy = input_ids.masked_fill(corrupt, self.mask_token_id)
        logits = self(noisy)
        token_nll = F.cross_entropy(logits.transpose(1, 2).float(), input_ids, reduction="none")
        masked_nll = (token_nll * masked).sum(dim=1)
        lengths = response_mask.sum(dim=1).clamp(min=1).to(masked_nll.dtype)
        counts = masked.sum(dim=1).to(masked_nll.dtype)
        value = -masked_nll * lengths / counts.clamp(min=1)
        return value / lengths if per_token else value

    def token_logprobs(self, input_ids: Tensor, response_mask: Tensor, prompt_masked: Tensor | None = None) -> Tensor:
        """diffu-GRPO's one-step estimate: log p of every response token with the whole response masked.

        Returns (B, T) log-probabilities (0 off the response). ``prompt_masked`` (B, T) bool optionally
        masks prompt tokens too (d1 masks each prompt token with probability 0.15 per update).
        """
        _check_batch(input_ids, response_mask)
        corrupt = response_mask if prompt_masked is None else response_mask | prompt_masked
        logits = self(input_ids.masked_fill(corrupt, self.mask_token_id))
        logprobs = -F.cross_entropy(logits.transpose(1, 2).float(), input_ids, reduction="none")
        return logprobs * response_mask

    # ------------------------------------------------------------------ reverse process

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        response_length: int,
        steps: int | None = None,
        temperature: float = 1.0,
        suppress_token_ids: list[int] | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample responses (B, response_length) by low-confidence remasking.

        The response starts fully masked. At each of ``steps`` steps (default: one token per step)
        every masked position gets a sampled token (``temperature`` > 0: categorical at that
        temperature, 0: argmax); the ``n_s`` positions whose sampled token has the highest model
        probability are committed and the others go back to the mask, with the ``n_s`` spread
        evenly so that all ``response_length`` tokens are committed after the last step.
        The mask token and ``suppress_token_ids`` are never sampled.
        """
        if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2:
            shape = tuple(prompt_ids.shape) if isinstance(prompt_ids, Tensor) else type(prompt_ids).__name__
            raise ValueError(f"prompt_ids must be a (batch, prompt_length) tensor, got {shape}")
        check_token_ids("prompt_ids", prompt_ids, self.vocab_size)
        check_positive_int("response_length", response_length)
        steps = response_length if steps is None else steps
        check_int("steps", steps, low=1, high=response_length)
        check_nonnegative_float("temperature", temperature)
        suppress_token_ids = check_token_ids("suppress_token_ids", suppress_token_ids, self.vocab_size)
        batch, prompt_length = prompt_ids.shape
        device = prompt_ids.device
        response = torch.full((batch, response_length), self.mask_token_id, dtype=prompt_ids.dtype, device=device)
        banned = torch.tensor([self.mask_token_id, *suppress_token_ids], device=device)
        # n_s for each step: as even as possible, summing to response_length
        per_step = torch.full((steps,), response_length // steps)
        per_step[: response_length % steps] += 1
        for n_commit in per_step.tolist():
            logits = self(torch.cat([prompt_ids, response], dim=1))[:, prompt_length:].float()
            logits[..., banned] = float("-inf")
            probs = logits.softmax(dim=-1)
            if temperature > 0:
                sample_probs = (logits / temperature).softmax(dim=-1)
                flat = torch.multinomial(sample_probs.flatten(0, 1), 1, generator=generator)
                tokens = flat.view(batch, response_length)
            else:
                tokens = logits.argmax(dim=-1)
            confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
            still_masked = response == self.mask_token_id
            confidence = confidence.masked_fill(~still_masked, float("-inf"))
            chosen = confidence.topk(n_commit, dim=1).indices
            commit = torch.zeros_like(still_masked).scatter_(1, chosen, True) & still_masked
            response = torch.where(commit, tokens.to(response.dtype), response)
        return response


def _check_batch(input_ids: Tensor, response_mask: Tensor) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {shape}")
    if response_mask.shape != input_ids.shape or response_mask.dtype != torch.bool:
        raise ValueError(
            f"response_mask must be a bool tensor of shape {tuple(input_ids.shape)}, "
            f"got {response_mask.dtype} {tuple(response_mask.shape)}"
        )


def tiny_diffusion_lm(
    vocab_size: int,
    mask_token_id: int,
    pad_token_id: int,
    max_length: int = 64,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
) -> MaskedDiffusionLM:
    """A small randomly initialised ``BertForMaskedLM`` (dropout 0) wrapped as a masked-diffusion LM.

    ``pad_token_id`` must be a token the data never uses as content (BERT zeroes its embedding).
    """
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=pad_token_id,
        type_vocab_size=1,
    )
    return MaskedDiffusionLM(BertForMaskedLM(config), mask_token_id=mask_token_id)
