"""Real data that ships on the machine: nothing here downloads.

- Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX files).
- scikit-learn's bundled 8x8 digits.
- English text: the documentation strings of Python's standard library.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    f"{sys.prefix}/share/datasets/fashion-mnist",
    "/usr/local/share/datasets/fashion-mnist",
)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


FASHION_MNIST_FETCH = "scripts/fetch-fashion-mnist.sh"
"""The script (run by ``make venv``) that installs Debian's package, or unpacks it without root into
``<sys.prefix>/share/datasets/fashion-mnist``: the second of :data:`FASHION_MNIST_DIRS`."""


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX ``.gz`` files.

    ``root`` when given; otherwise the first of ``$FASHION_MNIST_DIR`` and :data:`FASHION_MNIST_DIRS`
    that holds ``train-images-idx3-ubyte.gz``. Raises ``FileNotFoundError`` naming the folders tried
    and the commands that install the data.
    """
    candidates = [root] if root is not None else [os.environ.get("FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    raise FileNotFoundError(
        "Fashion-MNIST IDX files not found (looked in "
        + ", ".join(str(c) for c in candidates if c)
        + "). Install Debian's package with `sudo apt-get update && sudo apt-get install dataset-fashion-mnist`, "
        f"or without root run `{FASHION_MNIST_FETCH} --user {sys.executable}` (what `make venv` runs), "
        "or pass root= / set FASHION_MNIST_DIR to a folder holding train-images-idx3-ubyte.gz."
    )


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header_bytes)


def fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images and labels.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: folder of the four IDX ``.gz`` files; by default Debian's install location.
        limit: keep only the first ``limit`` examples.

    Returns:
        ``images`` float32 ``[N, 1, 28, 28]`` in [0, 1] and ``labels`` int64 ``[N]`` in 0..9.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_dir(root)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 8)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).

    Returns:
        ``images`` float32 ``[1797, 1, 8, 8]`` in [0, 1] and ``labels`` int64 ``[1797]``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(bunch.target, dtype=torch.int64)


STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "io",
    "itertools", "json", "logging", "math", "os", "pathlib", "pickle", "random", "re", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def stdlib_docstrings(modules: tuple[str, ...] = STDLIB_MODULES, min_chars: int = 200) -> list[str]:
    """English paragraphs: the docstrings of the standard-library modules and their public members.

    Deterministic for a given Python version: members are visited in sorted order and docstrings
    shorter than ``min_chars`` characters are dropped.
    """
    texts: list[str] = []
    seen: set[str] = set()
    for name in modules:
        module = importlib.import_module(name)
        members = [module] + [getattr(module, attr) for attr in sorted(dir(module)) if not attr.startswith("_")]
        for member in members:
            doc = inspect.getdoc(member)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                texts.append(doc)
    return texts


def split_texts(texts: list[str], held_out_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Shuffle whole documents with ``seed`` and split them into (train, held_out)."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, int(len(texts) * held_out_fraction))
    return [texts[i] for i in order[cut:]], [texts[i] for i in order[:cut]]


def token_blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize ``texts``, join them with the EOS token and cut into blocks.

    Returns:
        int64 ``[num_blocks, seq_len]``; the tail shorter than ``seq_len`` is dropped.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    usable = len(ids) // seq_len * seq_len
    if usable == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than seq_len={seq_len}")
    return torch.tensor(ids[:usable], dtype=torch.int64).view(-1, seq_len)
