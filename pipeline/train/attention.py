"""Attention masks for packed rows: causal within each example (its tokens share a document id,
counted from the position resets), never across examples or into the padding, and with the
family's own pattern per layer: full or a sliding window (pipeline/families.py).

One definition, `mask_function`, in transformers' mask-function form, serves both paths:
- dense (CPU, and families without a flex kernel): one row per packed sequence; transformers' own
  mask interface for the model's attention implementation (sdpa's boolean mask, eager's additive
  one) evaluates it;
- flex (GPU): the micro-batch as one padding-free row; flex attention's block mask, built once per
  micro-batch without transformers' packed-sequence check (which reads a flag back from the GPU).
Families whose config has `layer_types` take a dict of masks by layer type; the others one mask
for every layer. Built here rather than by the model because a model's forward does not always
see the packing (gpt-oss builds its masks without the position ids) nor, on the flex path, the window.
"""

from __future__ import annotations

import torch

from pipeline.families import layer_attention


def mask_function(kind: str, size: int | None, documents: torch.Tensor):
    """(batch, head, query, key) -> may attend. `documents`: [rows, length] (the flex path: [1,
    tokens]). Sliding: the key is one of the last `size` positions of the query's example, as
    transformers' sliding_window_overlay."""

    def may_attend(batch, head, query, key):
        allowed = (documents[batch, query] == documents[batch, key]) & (query >= key)
        if kind == "sliding":
            allowed = allowed & (key > query - size)
        return allowed

    return may_attend


def layer_kinds(config) -> dict[str, tuple[str, int | None]]:
    """The masks a model's forward takes: by layer type where the config has `layer_types` (the
    forward then accepts a dict), else one ("" key) for every layer."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        first = {kind: layer_types.index(kind) for kind in dict.fromkeys(layer_types)}
        return {kind: layer_attention(config, layer) for kind, layer in first.items()}
    return {"": layer_attention(config, 0)}


def _as_forward_argument(masks: dict):
    return masks[""] if "" in masks else masks


def dense_masks(config, position_ids: torch.Tensor, dtype: torch.dtype, device: torch.device):
    """The masks for [rows, length] packed rows, in the form the model's attention implementation
    takes (transformers' own mask interface evaluates `mask_function`); None (the model builds its
    own) where every row is one whole example."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    position_ids = position_ids.to(device)
    if not bool((position_ids[:, 1:] == 0).any()):
        # one example a row, no padding: exactly what the model's own masks are for, and sdpa's
        # causal kernel then needs no mask at all
        return None
    documents = (position_ids == 0).cumsum(-1)
    rows, length = position_ids.shape
    build = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    masks = {
        key: build(
            batch_size=rows,
            q_length=length,
            kv_length=length,
            q_offset=0,
            kv_offset=0,
            mask_function=mask_function(kind, size, documents),
            attention_mask=None,
            allow_is_causal_skip=False,
            dtype=dtype,
            config=config,
            use_vmap=False,
            device=device,
        )
        for key, (kind, size) in layer_kinds(config).items()
    }
    return _as_forward_argument(masks)


def flex_masks(config, position_ids: torch.Tensor, device: torch.device):
    """Flex attention's block masks for a micro-batch run as one padding-free row."""
    from torch.nn.attention.flex_attention import create_block_mask

    flat = position_ids.reshape(1, -1).to(device)
    documents = (flat == 0).cumsum(-1)
    tokens = flat.shape[1]
    masks = {}
    for key, (kind, size) in layer_kinds(config).items():
        may_attend = mask_function(kind, size, documents)
        masks[key] = create_block_mask(
            may_attend, None, None, tokens, tokens, device=device, _compile=device.type == "cuda"
        )  # as transformers builds its own
    return _as_forward_argument(masks)
