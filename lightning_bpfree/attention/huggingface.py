"""Switch a transformers model's self-attention to SOFT in place, through transformers' attention interface.

Two registrations under the name ``"soft"`` make it work:

- ``AttentionInterface``: the function that layers call with their projected ``query/key/value``; it runs
  the :class:`~lightning_bpfree.attention.soft.SOFTKernelAttention` attached to each layer.
- ``AttentionMaskInterface``: without it transformers treats ``"soft"`` as a backend that needs no mask
  and the padding mask never arrives. Ours hands the 2D padding mask on as a ``[B, 1, 1, N]`` bool tensor
  instead of materialising the ``[B, 1, N, N]`` mask, so memory stays linear in ``N``.

SOFT ties queries and keys (its kernel is ``exp(-||q_i - q_j||^2 / 2)``), so the layer's own query
projection gives both and its key projection is left unused. SOFT has no causal or cross-attention form:
landmarks summarise every token, so they would leak the future, and the kernel needs ``K = Q``.

Saving and loading: the switch records its settings in ``config.soft_attention`` and
``config.attn_implementation = "soft"``, both written to ``config.json`` by ``save_pretrained``.
``use_soft_attention(AutoModel.from_pretrained(path))`` reads the settings back and loads the SOFT
weights that ``from_pretrained`` leaves out (it reports them as unexpected keys). A SOFT checkpoint
never loads silently as ordinary attention: without this module imported transformers refuses
``attn_implementation="soft"``, and with it the first forward pass raises until the switch is made.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bpfree.attention.soft import SOFTKernelAttention

IMPLEMENTATION_NAME = "soft"
CORE_ATTRIBUTE = "soft_attention"
# The config attribute holding the SOFT settings; transformers writes it to config.json.
CONFIG_SETTINGS = "soft_attention"
# What use_soft_attention(**options) accepts: the SOFTKernelAttention arguments, except the head size,
# which each layer's own projections fix.
_CORE_PARAMETERS = inspect.signature(SOFTKernelAttention).parameters
SOFT_OPTIONS = tuple(name for name in _CORE_PARAMETERS if name != "head_dim")


def _registered_interfaces() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION_NAME, soft_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, soft_padding_mask)


def soft_padding_mask(
    *, kv_length: int, kv_offset: int = 0, mask_function: Any = None, attention_mask: Tensor | None = None,
    **mask_arguments: Any,
) -> Tensor | None:  # fmt: skip
    """transformers mask hook: the padding mask as bool ``[B, 1, 1, kv_length]`` (True = attend), or None.

    transformers calls every mask interface with keyword arguments (``batch_size``, ``q_length``,
    ``q_offset``, ``dtype``, ``config``, ...); this hook reads only the key-side ones named here and
    hands the rest on untouched in ``mask_arguments``.

    Only plain bidirectional masks reduce to a key padding mask; any other mask function (causal, sliding
    window, packed sequences) gets the full ``[B, 1, Nq, Nk]`` mask from ``sdpa_mask``, which the
    attention function then checks and rejects if it is not a padding mask.
    """
    from transformers.masking_utils import bidirectional_mask_function, prepare_padding_mask, sdpa_mask

    if mask_function is not bidirectional_mask_function:
        # The full mask cannot be skipped here: the attention function must see it to reject it.
        mask_arguments.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(
            kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
            **mask_arguments,
        )  # fmt: skip
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    padding = padding[:, kv_offset : kv_offset + kv_length].bool()
    return None if bool(padding.all()) else padding[:, None, None, :]


def key_padding_from_attention_mask(attention_mask: Tensor | None, batch: int, tokens: int) -> Tensor | None:
    """A transformers attention mask as a key padding mask (bool ``[B, N]``, True = padding).

    Accepts bool or 0/1 integer masks (True/1 = attend) and additive float masks (0 = attend, large
    negative = masked) of shape ``[B, 1, Nq, N]`` or ``[B, 1, 1, N]``. A mask that varies between real
    query rows is not a padding mask (causal, sliding window): ``ValueError``.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != tokens or attention_mask.shape[0] != batch:
        raise ValueError(
            f"SOFT expects an attention mask of shape [B, 1, Nq, N] or [B, 1, 1, N] with B={batch}, "
            f"N={tokens}; got {tuple(attention_mask.shape)}"
        )
    if attention_mask.is_floating_point():
        attend = attention_mask > -1.0  # additive: 0 where attended, a large negative number elsewhere
    else:
        attend = attention_mask.bool()  # bool or 0/1 integers: nonzero where attended
    attend = attend.all(dim=1)  # [B, Nq, N]
    key_valid = attend.any(dim=1)  # [B, N]
    rows_with_keys = attend.any(dim=-1, keepdim=True)
    if not bool(torch.where(rows_with_keys, attend == key_valid[:, None, :], True).all()):
        raise ValueError(
            "SOFT can only apply key padding masks (the same keys for every query); this attention mask "
            "differs between queries, e.g. a causal or sliding-window mask"
        )
    return ~key_valid


def soft_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` function: ``query/key/value [B, heads, N, d] -> ([B, N, heads, d], None)``.

    ``key`` is ignored (SOFT ties keys to queries) except for checking that this is self-attention;
    ``scaling`` is replaced by SOFT's ``d^-1/4`` on the queries; attention dropout does not apply (there
    are no attention probabilities).
    """
    core = getattr(module, CORE_ATTRIBUTE, None)
    if not isinstance(core, SOFTKernelAttention):
        if isinstance(getattr(getattr(module, "config", None), CONFIG_SETTINGS, None), Mapping):
            raise ValueError(
                f"{type(module).__name__} has no SOFT core: this model was saved with SOFT attention "
                "(config.soft_attention) and loaded without its SOFT layers; call "
                "lightning_bpfree.attention.use_soft_attention(model) after from_pretrained to restore them"
            )
        raise ValueError(
            f"{type(module).__name__} has no SOFT core; call "
            "lightning_bpfree.attention.use_soft_attention(model) rather than setting "
            "attn_implementation='soft' by hand"
        )
    if getattr(module, "is_causal", False) or kwargs.get("is_causal"):
        raise ValueError("SOFT attention cannot be causal: its landmarks summarise all tokens, future ones too")
    if key.shape[-2] != query.shape[-2] or kwargs.get("encoder_hidden_states") is not None:
        raise ValueError(
            "SOFT attention is self-attention only (keys are the queries); cross-attention is not supported"
        )
    if query.shape[1] != value.shape[1]:
        raise ValueError("SOFT attention needs as many key/value heads as query heads (no grouped-query attention)")
    batch, _, tokens, head_dim = query.shape
    key_padding_mask = key_padding_from_attention_mask(attention_mask, batch, tokens)
    out = core(query * head_dim**-0.25, value, key_padding_mask=key_padding_mask)
    return out.transpose(1, 2).contiguous(), None


def _attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that dispatch through ``ALL_ATTENTION_FUNCTIONS`` (they carry ``is_causal`` and ``config``)."""
    layers = []
    for name, module in model.named_modules():
        if hasattr(module, "is_causal") and hasattr(module, "config") and not isinstance(module, nn.ModuleList):
            if hasattr(module, "get_input_embeddings"):
                continue  # a whole model, not a layer
            layers.append((name, module))
    return layers


def _head_dim(module: nn.Module) -> int:
    for attribute in ("head_dim", "attention_head_size"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    config = module.config
    return config.hidden_size // config.num_attention_heads


def use_soft_attention(model: nn.Module, **options: Any) -> nn.Module:
    """Switch a transformers model's self-attention layers to SOFT, in place; returns ``model``.

    Each attention layer gets a :class:`~lightning_bpfree.attention.soft.SOFTKernelAttention` (attribute
    ``soft_attention``, new trainable parameters on the layer's device and dtype) and the model's
    ``attn_implementation`` becomes ``"soft"``. Padding masks reach SOFT through the registered mask
    interface. ``model.set_attn_implementation("sdpa")`` switches back (the added cores stay, unused).

    Works for encoders that use transformers' ``AttentionInterface`` (BERT, RoBERTa, ViT, ...).

    The settings are recorded in ``model.config.soft_attention`` (and ``config.attn_implementation``), so
    ``save_pretrained`` saves them. To load a saved SOFT model, switch it again without options:
    ``use_soft_attention(AutoModel.from_pretrained(path))`` takes the settings from the config and the
    SOFT weights from the checkpoint ``from_pretrained`` read (local files only, nothing is downloaded).

    Args:
        model: a transformers ``PreTrainedModel``.
        **options: :class:`~lightning_bpfree.attention.soft.SOFTKernelAttention` options:
            ``num_landmarks`` (49), ``newton_iters`` (20), ``normalize`` (False), ``landmarks`` ("pool"),
            ``conv_stride``, ``project_landmarks``, ``value_conv_kernel``, ``ridge`` (0.0; the released
            SOFT code uses 0.01), ``landmark_bias`` (True; the released code has none). Without options, the settings
            saved in ``model.config.soft_attention`` if there are any, else the defaults.

    Raises:
        ValueError: a causal (decoder) or encoder-decoder model, cross-attention layers, grouped-query
            attention, a model without ``AttentionInterface`` layers, options that contradict the
            saved ``config.soft_attention``, or a checkpoint that holds only some of the SOFT weights.
        TypeError: an unknown option, or a model that is not a transformers model.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    unknown = sorted(set(options) - set(SOFT_OPTIONS))
    if unknown:
        raise TypeError(f"unknown SOFT option(s) {unknown}; accepted: {sorted(SOFT_OPTIONS)}")
    saved = _saved_settings(config)
    settings = soft_settings(options) if options or saved is None else saved
    if saved is not None and options and settings != saved:
        raise ValueError(
            f"the model's config.soft_attention records SOFT settings {saved}, which differ from the options "
            f"{settings}; call use_soft_attention(model) without options to restore the saved SOFT layers, or "
            "delete config.soft_attention first to switch afresh"
        )
    if getattr(config, "add_cross_attention", False):
        raise ValueError("the model has cross-attention layers; SOFT is self-attention only (keys are the queries)")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is a decoder or encoder-decoder model: SOFT attention cannot be causal "
            "(its landmarks summarise future tokens); use it on encoders such as BERT or ViT"
        )
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layers that use transformers' AttentionInterface, so SOFT "
            "cannot be switched in (models with their own attention class, such as Nystromformer, "
            "are not supported)"
        )
    for name, layer in layers:
        if layer.is_causal:
            raise ValueError(
                f"layer {name!r} ({type(layer).__name__}) is causal: SOFT attention cannot be causal (its "
                "landmarks summarise future tokens); use it on encoders such as BERT or ViT"
            )
        if "Cross" in type(layer).__name__ or getattr(layer, "is_cross_attention", False):
            raise ValueError(f"layer {name!r} is cross-attention; SOFT is self-attention only (keys are the queries)")
    reference = next(model.parameters())
    # Every core is built (and its saved weights read) before the first is attached, so a failure
    # leaves the model as it came.
    cores = {
        name: SOFTKernelAttention(_head_dim(layer), **settings).to(device=reference.device, dtype=reference.dtype)
        for name, layer in layers
    }
    if saved is not None and not any(
        isinstance(getattr(layer, CORE_ATTRIBUTE, None), nn.Module) for _, layer in layers
    ):
        _load_saved_cores(model, cores)
    _registered_interfaces()
    for name, layer in layers:
        layer.add_module(CORE_ATTRIBUTE, cores[name])
    model.set_attn_implementation(IMPLEMENTATION_NAME)
    if model.config._attn_implementation != IMPLEMENTATION_NAME:
        raise RuntimeError(f"transformers did not accept attn_implementation={IMPLEMENTATION_NAME!r}")
    # Both go to config.json: the settings rebuild the layers on loading, and attn_implementation makes a
    # loader that skips use_soft_attention fail loudly instead of running ordinary attention.
    setattr(config, CONFIG_SETTINGS, settings)
    config.attn_implementation = IMPLEMENTATION_NAME
    return model


def soft_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The full SOFT settings of ``use_soft_attention(**options)``: every option, defaults filled in."""
    return {name: options.get(name, _CORE_PARAMETERS[name].default) for name in SOFT_OPTIONS}


def _saved_settings(config: Any) -> dict[str, Any] | None:
    """``config.soft_attention`` (written by an earlier switch, possibly loaded from config.json), checked."""
    saved = getattr(config, CONFIG_SETTINGS, None)
    if saved is None:
        return None
    if not isinstance(saved, Mapping) or set(saved) - set(SOFT_OPTIONS):
        raise ValueError(f"config.soft_attention must be a dict of SOFT options {sorted(SOFT_OPTIONS)}, got {saved!r}")
    return soft_settings(saved)


def _checkpoint_tensors(source: str) -> dict[str, Tensor] | None:
    """The SOFT tensors of a saved checkpoint (local folder or hub cache, never downloaded); None if none found."""
    from transformers.utils import cached_file

    def locate(filename: str) -> str | None:
        try:
            return cached_file(
                source, filename, local_files_only=True, _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )  # fmt: skip
        except OSError:
            return None

    for weights, index in (("model.safetensors", "model.safetensors.index.json"),
                           ("pytorch_model.bin", "pytorch_model.bin.index.json")):  # fmt: skip
        files = [locate(weights)]
        if files[0] is None and (index_file := locate(index)) is not None:
            shards = sorted(set(json.loads(Path(index_file).read_text())["weight_map"].values()))
            files = [locate(shard) for shard in shards]
        if all(files):
            tensors: dict[str, Tensor] = {}
            for file in files:
                if file.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    state = load_file(file)
                else:
                    state = torch.load(file, map_location="cpu", weights_only=True)
                tensors.update({key: value for key, value in state.items() if f".{CORE_ATTRIBUTE}." in key})
            return tensors
    return None


def _load_saved_cores(model: nn.Module, cores: dict[str, SOFTKernelAttention]) -> None:
    """Fill ``cores`` with the SOFT weights of the checkpoint ``model`` was loaded from (``config._name_or_path``).

    A model built from a config alone (no checkpoint path) keeps freshly initialised cores; a checkpoint
    path without SOFT weights gets a warning, or a ``ValueError`` when only some are there.
    """
    source = str(getattr(model.config, "_name_or_path", "") or "")
    if not source:
        return
    saved = _checkpoint_tensors(source)
    if not saved:
        warnings.warn(
            f"config.soft_attention says the model uses SOFT attention, but no SOFT weights were found at "
            f"{source!r}; the SOFT layers start freshly initialised",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for name, core in cores.items():
        state = {}
        for key in core.state_dict():
            wanted = f"{name}.{CORE_ATTRIBUTE}.{key}"
            # The checkpoint may carry the base model's prefix (saved from a task head) or lack it.
            candidates = (wanted, prefix + wanted, wanted.removeprefix(prefix))
            found = next((saved[c] for c in candidates if c in saved), None)
            if found is None:
                raise ValueError(f"the checkpoint at {source!r} has no SOFT weight {wanted!r}")
            state[key] = found
        core.load_state_dict(state)


# Registered on import, so that from_pretrained accepts a saved config's attn_implementation="soft".
try:
    _registered_interfaces()
except ImportError:  # transformers missing: use_soft_attention raises when it is called
    pass
