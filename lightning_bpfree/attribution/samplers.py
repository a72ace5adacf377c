"""Where ReAGent's replacement tokens come from.

A sampler is any callable ``sampler(input_ids, replace_mask, generator) -> replacements`` with
``input_ids`` int64 ``[B, N]`` (each row is a copy of the sequence being explained), ``replace_mask``
bool ``[B, N]`` and the result int64 ``[B, N]``; only the entries under the mask are used.

The ReAGent paper proposes replacements with RoBERTa; its released configuration and inseq use a
part-of-speech-matched sampler that needs NLTK data downloaded at run time. The three samplers here
need nothing from the network:

- ``UniformTokenSampler``: any vocabulary token (special tokens excluded) with equal probability;
- ``FrequencyTokenSampler``: tokens drawn by their unigram frequency in a corpus, so replacements
  look like ordinary text rather than rare sub-words;
- ``LanguageModelTokenSampler``: a causal LM's own proposal for each position given the tokens
  before it (a left-context stand-in for the paper's masked-LM proposals).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from lightning_bpfree.attribution.model_interface import (
    LanguageModel,
    check_finite_logits,
    check_model,
    evaluation_mode,
    model_device,
    output_logits,
)
from lightning_bpfree.validation import (
    check_float,
    check_int,
    check_nonnegative_float,
    check_optional,
    check_positive_int,
)

TokenSampler = Callable[[Tensor, Tensor, "torch.Generator | None"], Tensor]


def _allowed_ids(vocab_size: int, exclude_ids: Iterable[int]) -> Tensor:
    check_int("vocab_size", vocab_size, low=2)
    keep = torch.ones(vocab_size, dtype=torch.bool)
    excluded = [int(i) for i in exclude_ids if i is not None and 0 <= int(i) < vocab_size]
    keep[excluded] = False
    if not bool(keep.any()):
        raise ValueError("exclude_ids removes every token of the vocabulary")
    return keep.nonzero().squeeze(1)


class UniformTokenSampler:
    """Replacement tokens drawn uniformly from the vocabulary minus ``exclude_ids`` (e.g. special tokens)."""

    def __init__(self, vocab_size: int, exclude_ids: Sequence[int] = ()) -> None:
        self.allowed = _allowed_ids(vocab_size, exclude_ids)

    def __call__(self, input_ids: Tensor, replace_mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        index = torch.randint(self.allowed.numel(), input_ids.shape, generator=generator)
        return self.allowed[index].to(input_ids.device)


class FrequencyTokenSampler:
    """Replacement tokens drawn by their unigram frequency in a corpus of token ids.

    Args:
        corpus_ids: int tensor of any shape: the corpus, tokenised with the explained model's tokenizer.
        vocab_size: size of the vocabulary.
        exclude_ids: ids never proposed (special tokens).
        smoothing: pseudo-count added to every allowed token (0 = only tokens seen in the corpus).
    """

    def __init__(
        self, corpus_ids: Tensor, vocab_size: int, exclude_ids: Sequence[int] = (), smoothing: float = 0.0
    ) -> None:
        allowed = _allowed_ids(vocab_size, exclude_ids)
        flat = torch.as_tensor(corpus_ids).flatten()
        if flat.is_floating_point() or flat.is_complex() or flat.dtype == torch.bool:
            raise TypeError(f"corpus_ids must hold integer token ids, got dtype {flat.dtype}")
        flat = flat.long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
            raise ValueError(f"corpus_ids must be token ids in [0, {vocab_size})")
        check_nonnegative_float("smoothing", smoothing)
        counts = torch.bincount(flat, minlength=vocab_size).double()[allowed] + smoothing
        if float(counts.sum()) <= 0:
            raise ValueError("the corpus holds no allowed token; pass a larger corpus or smoothing > 0")
        self.allowed = allowed
        self.weights = counts / counts.sum()

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], **kwargs) -> FrequencyTokenSampler:
        """Count token frequencies of ``texts`` with ``tokenizer`` (special tokens excluded by default)."""
        ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        kwargs.setdefault("exclude_ids", list(getattr(tokenizer, "all_special_ids", [])))
        return cls(torch.tensor(ids, dtype=torch.long), len(tokenizer), **kwargs)

    def __call__(self, input_ids: Tensor, replace_mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        index = torch.multinomial(self.weights, input_ids.numel(), replacement=True, generator=generator)
        return self.allowed[index].view(input_ids.shape).to(input_ids.device)


class LanguageModelTokenSampler:
    """Proposals from a causal LM: position n gets a token drawn from ``q(. | x_<n)``.

    The proposal distributions of a sequence are computed once (one forward pass) and reused for
    every probe of that sequence. Position 0 has no left context: it uses the mean of the other
    positions' proposals.

    Args:
        proposal_model: a causal LM over the same vocabulary (often the explained model itself).
        temperature: softmax temperature of the proposals.
        exclude_ids: ids never proposed (special tokens).
        top_k: if set, sample only among each position's ``top_k`` most likely tokens.
    """

    def __init__(
        self,
        proposal_model: LanguageModel,
        temperature: float = 1.0,
        exclude_ids: Sequence[int] = (),
        top_k: int | None = None,
    ) -> None:
        check_model(proposal_model, "proposal_model")
        self.model = proposal_model
        # an infinite temperature is allowed: it flattens the proposals to uniform
        self.temperature = check_float("temperature", temperature, low=0.0, low_open=True, allow_inf=True)
        self.exclude_ids = list(exclude_ids)
        self.top_k = check_optional(check_positive_int, "top_k", top_k)
        self._cached: tuple[Tensor, Tensor] | None = None

    def proposals(self, sequence: Tensor) -> Tensor:
        """Proposal distributions ``[N, V]`` for the positions of one sequence ``[N]``."""
        if self._cached is not None and torch.equal(self._cached[0], sequence):
            return self._cached[1]
        with torch.no_grad(), evaluation_mode(self.model):
            output = output_logits(self.model(sequence[None].to(model_device(self.model))))
            logits = check_finite_logits(output[0].float(), "in LanguageModelTokenSampler's proposals").cpu()
        logits = logits / self.temperature
        if self.exclude_ids:
            logits[:, self.exclude_ids] = float("-inf")
        if self.top_k is not None:
            cut = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < cut, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # row n predicts position n + 1
        first = probs[:-1].mean(0, keepdim=True) if probs.shape[0] > 1 else probs[:1]
        table = torch.cat([first, probs[:-1]])
        self._cached = (sequence.clone(), table)
        return table

    def __call__(self, input_ids: Tensor, replace_mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # ReAGent's probes are copies of one sequence, so one proposal table serves every row.
        table = self.proposals(input_ids[0].cpu())
        draws = torch.multinomial(table, input_ids.shape[0], replacement=True, generator=generator)  # [N, B]
        return draws.T.contiguous().to(input_ids.device)


def resolve_sampler(sampler, vocab_size: int, exclude_ids: Sequence[int] = ()) -> TokenSampler:
    """``"uniform"`` or any sampler callable -> a sampler callable."""
    if isinstance(sampler, str):
        if sampler == "uniform":
            return UniformTokenSampler(vocab_size, exclude_ids)
        raise ValueError(
            f"sampler must be 'uniform' or a sampler object (FrequencyTokenSampler, LanguageModelTokenSampler, "
            f"or any callable(input_ids, replace_mask, generator)), got {sampler!r}"
        )
    if not callable(sampler):
        raise TypeError(f"sampler must be a string or a callable, got {type(sampler).__name__}")
    return sampler
