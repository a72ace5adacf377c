"""A key-value retrieval task whose answer-bearing token is known, and a tiny LM trained on it.

Each prompt is ``PAIRS`` context tokens, a separator and a query: context token ``i`` encodes a
(key, value) pair (one token per pair, keys distinct), the query names one of the keys, and the
answer is the value stored with it. Exactly one context token carries the answer, so an
attribution method can be scored by whether it ranks that token first among the context. The query
token is necessary too (it says which pair to read), so it is left out of that ranking.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

NUM_KEYS, NUM_VALUES, PAIRS = 8, 8, 5
PAIR0 = 3  # ids 0-2 are the special tokens of lightning_bpfree.models.tiny_causal_lm
QUERY0 = PAIR0 + NUM_KEYS * NUM_VALUES
SEPARATOR = QUERY0 + NUM_KEYS
VOCAB_SIZE = SEPARATOR + 1


def retrieval_batch(size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Random prompts of the retrieval task.

    Returns:
        ``input_ids`` int64 ``[size, PAIRS + 2]``, ``answers`` int64 ``[size]`` (the value as a token
        id) and ``answer_positions`` int64 ``[size]`` (the context position holding the answer).
    """
    keys = torch.argsort(torch.rand(size, NUM_KEYS, generator=generator), dim=1)[:, :PAIRS]
    values = torch.randint(0, NUM_VALUES, (size, PAIRS), generator=generator)
    asked = torch.randint(0, PAIRS, (size,), generator=generator)
    rows = torch.arange(size)
    pairs = PAIR0 + keys * NUM_VALUES + values
    ids = torch.cat([pairs, torch.full((size, 1), SEPARATOR), QUERY0 + keys[rows, asked, None]], dim=1)
    return ids, PAIR0 + values[rows, asked], asked


@functools.lru_cache(maxsize=2)
def train_retrieval_model(steps: int = 450, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """A one-layer GPT-2 (d=64) trained to answer retrieval prompts (about 99% accuracy; seconds on CPU).

    Cached per arguments within a process (treat the returned model as read-only).
    """
    from lightning_bpfree.models import tiny_causal_lm

    model = tiny_causal_lm("gpt2", vocab_size=VOCAB_SIZE, hidden_size=64, num_layers=1, num_heads=4, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        ids, answers, _ = retrieval_batch(batch_size, generator)
        loss = nn.functional.cross_entropy(model(ids).logits[:, -1], answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
