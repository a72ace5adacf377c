"""Verifiable synthetic tasks for RL on a diffusion LM: multi-digit addition with an exact-answer reward.

A prompt is ``a+b=`` with both operands zero-padded to ``num_digits`` digits, the response is the
sum zero-padded to ``num_digits + 1`` digits (e.g. ``37+05=`` -> ``042``). The reward is 1 when the
response is exactly the sum and 0 otherwise. The operand pairs are split once, at random, into a
training set and a held-out set so that accuracy is measured on problems never trained on.

Plain PyTorch; no Lightning import.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_bpfree.bgpo.masked_lm import MaskedDiffusionLM, tiny_diffusion_lm
from lightning_bpfree.validation import check_float, check_int, check_seed


class AdditionTask:
    """``num_digits``-digit addition over a 14-token vocabulary: digits 0-9, ``+``, ``=``, pad, mask.

    Args:
        num_digits: digits per operand, 1 to 4.
        held_out_fraction: fraction of all operand pairs kept for evaluation only.
        seed: seed of the train / held-out split.
    """

    PLUS, EQUALS, PAD, MASK = 10, 11, 12, 13
    VOCAB_SIZE = 14

    def __init__(self, num_digits: int = 2, held_out_fraction: float = 0.2, seed: int = 0) -> None:
        check_int("num_digits", num_digits, low=1, high=4)
        check_float("held_out_fraction", held_out_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        check_seed("seed", seed)
        self.num_digits = num_digits
        self.prompt_length = 2 * num_digits + 2
        self.response_length = num_digits + 1
        base = 10**num_digits
        pairs = torch.randperm(base * base, generator=torch.Generator().manual_seed(seed))
        num_held_out = int(held_out_fraction * pairs.numel())
        self._pairs = {"held_out": pairs[:num_held_out], "train": pairs[num_held_out:]}
        self._base = base

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.response_length

    def operands(
        self, num: int, split: str = "train", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``num`` random operand pairs ``(a, b)`` from ``split`` ("train" or "held_out")."""
        if split not in self._pairs:
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        pool = self._pairs[split]
        pairs = pool[torch.randint(pool.numel(), (num,), generator=generator)]
        return pairs // self._base, pairs % self._base

    def _digits(self, values: Tensor, width: int) -> Tensor:
        powers = 10 ** torch.arange(width - 1, -1, -1)
        return (values[:, None] // powers) % 10

    def encode_prompts(self, a: Tensor, b: Tensor) -> Tensor:
        """(N, prompt_length) token ids of ``a+b=``."""
        n = self.num_digits
        plus = torch.full((a.numel(), 1), self.PLUS)
        equals = torch.full((a.numel(), 1), self.EQUALS)
        return torch.cat([self._digits(a, n), plus, self._digits(b, n), equals], dim=1)

    def encode_answers(self, a: Tensor, b: Tensor) -> Tensor:
        """(N, response_length) token ids of the zero-padded sum."""
        return self._digits(a + b, self.response_length)

    def decode_operands(self, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Operands of (N, prompt_length) prompts."""
        n = self.num_digits
        powers = 10 ** torch.arange(n - 1, -1, -1, device=prompts.device)
        return (prompts[:, :n] * powers).sum(1), (prompts[:, n + 1 : 2 * n + 1] * powers).sum(1)

    def reward(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """(N,) float rewards: 1.0 where ``responses`` (N, response_length) spell the exact sum."""
        if responses.shape != (prompts.shape[0], self.response_length):
            raise ValueError(
                f"responses must have shape ({prompts.shape[0]}, {self.response_length}), got {tuple(responses.shape)}"
            )
        a, b = self.decode_operands(prompts)
        target = self.encode_answers(a.cpu(), b.cpu()).to(responses.device)
        return (responses == target).all(dim=1).float()

    def supervised_dataset(self, num: int, generator: torch.Generator | None = None) -> TensorDataset:
        """``num`` solved training problems: ``(input_ids (N, T), response_mask (N, T) bool)``."""
        a, b = self.operands(num, "train", generator)
        input_ids = torch.cat([self.encode_prompts(a, b), self.encode_answers(a, b)], dim=1)
        response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        response_mask[:, self.prompt_length :] = True
        return TensorDataset(input_ids, response_mask)

    def prompt_dataset(self, num: int, split: str = "train", generator: torch.Generator | None = None) -> TensorDataset:
        """``num`` prompts (N, prompt_length) from ``split``, for rollouts."""
        return TensorDataset(self.encode_prompts(*self.operands(num, split, generator)))

    def make_policy(self, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4) -> MaskedDiffusionLM:
        """A fresh small BERT masked-diffusion LM over this task's vocabulary."""
        return tiny_diffusion_lm(
            self.VOCAB_SIZE,
            mask_token_id=self.MASK,
            pad_token_id=self.PAD,
            max_length=self.sequence_length,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
        )

    @torch.no_grad()
    def accuracy(
        self, policy: MaskedDiffusionLM, prompts: Tensor, temperature: float = 0.0, batch_size: int = 512
    ) -> float:
        """Mean reward of ``policy``'s answers to ``prompts`` (greedy when ``temperature`` is 0)."""
        was_training = policy.training
        policy.eval()
        rewards = []
        for chunk in prompts.split(batch_size):
            responses = policy.generate(
                chunk, self.response_length, temperature=temperature, suppress_token_ids=self.special_tokens
            )
            rewards.append(self.reward(chunk, responses))
        policy.train(was_training)
        return torch.cat(rewards).mean().item()

    @property
    def special_tokens(self) -> tuple[int, ...]:
        """Tokens an answer never contains (the sampler suppresses them)."""
        return (self.PLUS, self.EQUALS, self.PAD)
