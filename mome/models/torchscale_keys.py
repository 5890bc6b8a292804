"""torchscale BEiT-3 checkpoint keys in mome's ``MoMETransformer`` (beit3 layout): torch only.

``MoMETransformer``'s load hook converts such checkpoints on load, and :mod:`mome.compat.torchscale` (which
imports the model to convert whole torchscale modules) uses the same conversion; the model never imports
compat, so there is no import circle.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

POSITION_OFFSET = 2  # fairseq's convention: torchscale's position tables start at row 2

# torchscale name -> ours, applied to the key after "encoder." is stripped (first match wins).
_RENAMES = (
    (r"^layers\.(\d+)\.self_attn_layer_norm\.", r"layers.\1.norm1."),
    (r"^layers\.(\d+)\.self_attn\.", r"layers.\1.attn."),
    (r"^layers\.(\d+)\.final_layer_norm\.", r"layers.\1.norm2."),
    (r"^layer_norm\.", "norm."),
)
_EXPERT = re.compile(r"\.(A|B)\.")


def _rename(key: str) -> str:
    key = key[len("encoder.") :] if key.startswith("encoder.") else key
    for pattern, replacement in _RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return key


def convert_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchscale ``BEiT3`` state_dict in mome's ``MoMETransformer`` (beit3 layout) keys.

    ``x.A.w`` and ``x.B.w`` become ``x.w`` = stack([A, B]); the position tables lose their two offset
    rows and become ``vision_pos_embed`` / ``text_pos_embed`` ``(1, rows, D)``.
    """
    converted: dict[str, Tensor] = {}
    experts: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key == "encoder.embed_positions.A.weight":
            converted["vision_pos_embed"] = value[POSITION_OFFSET:].unsqueeze(0)
            continue
        if key == "encoder.embed_positions.B.weight":
            converted["text_pos_embed"] = value[POSITION_OFFSET:].unsqueeze(0)
            continue
        key = _rename(key)
        match = _EXPERT.search(key)
        if match is None:
            converted[key] = value
            continue
        merged = key[: match.start()] + "." + key[match.end() :]
        experts.setdefault(merged, {})[match.group(1)] = value
    for key, pair in experts.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"torchscale key {key!r} has only expert {sorted(pair)}: both A and B are needed")
        if pair["A"].shape != pair["B"].shape:
            raise ValueError(f"torchscale key {key!r}: experts A {tuple(pair['A'].shape)} and B differ in shape")
        converted[key] = torch.stack([pair["A"], pair["B"]])
    return converted
