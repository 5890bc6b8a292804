"""torchscale BEiT-3 compatibility: convert a model or its checkpoint, or patch its layers in place.

- :func:`from_beit3` builds a :class:`BEiT3Compat` (a ``MoMETransformer``) from a torchscale ``BEiT3``;
  its outputs match torchscale's, and it is also callable like torchscale's model.
- :func:`convert_state_dict` maps torchscale keys onto ours: the two experts ``*.A.*`` (vision) and
  ``*.B.*`` (language) are stacked on a leading expert dim. ``MoMETransformer.load_state_dict`` calls it
  by itself when it sees torchscale keys.
- :func:`patch` swaps torchscale's multiway Linear / LayerNorm / FFN for mome's and runs its
  self-attention on ``mome.ops.attention``, keeping the model object (its state_dict keys change to ours).

torchscale itself is never imported here: modules are recognised by class name and attributes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops
from mome.models.config import MoMEConfig
from mome.models.torchscale_keys import POSITION_OFFSET, convert_state_dict
from mome.models.transformer import MoMETransformer
from mome.nn.multiway import ModalityFFN, MultiwayLayerNorm, MultiwayLinear


def config_from_args(args) -> MoMEConfig:
    """The ``MoMEConfig`` of a torchscale ``EncoderConfig`` of a BEiT3; ValueError for what mome does not model."""
    unsupported = {
        "multiway": not args.multiway,
        "deepnorm": args.deepnorm,
        "encoder_normalize_before=False (post-norm)": not args.encoder_normalize_before,
        "normalize_output=False": not args.normalize_output,
        "xpos_rel_pos": args.xpos_rel_pos,
        "moe_freq (token-routed MoE)": args.moe_freq > 0,
        "layernorm_embedding": args.layernorm_embedding,
        "no_scale_embedding=False": not args.no_scale_embedding,
        f"activation_fn={args.activation_fn!r}": str(args.activation_fn) not in ("gelu", "relu"),
    }
    reasons = [name for name, bad in unsupported.items() if bad]
    if reasons:
        raise ValueError(f"this torchscale BEiT3 uses what mome does not model: {', '.join(reasons)}")
    dim, ffn_dim = args.encoder_embed_dim, args.encoder_ffn_embed_dim
    # torchscale's encoder adds its T5-style bucketed bias (one table, every layer) when both are set
    buckets = args.rel_pos_buckets > 0 and args.max_rel_pos > 0
    config = MoMEConfig(
        layout="beit3",
        dim=dim,
        depth=args.encoder_layers,
        heads=args.encoder_attention_heads,
        mlp_ratio=ffn_dim / dim,
        vocab_size=args.vocab_size,
        max_text_len=args.max_source_positions - POSITION_OFFSET,
        image_size=args.img_size,
        patch_size=args.patch_size,
        in_chans=args.in_chans,
        num_experts=2,
        vl_layers=0,
        layer_scale_init=None,
        eps=args.layernorm_eps,
        dropout=args.dropout,
        drop_path=args.drop_path_rate,
        subln=args.subln,
        activation=str(args.activation_fn),
        relative_position="buckets" if buckets else None,
        rel_pos_buckets=args.rel_pos_buckets if buckets else 32,
        max_rel_pos=args.max_rel_pos if buckets else 128,
        attention_dropout=args.attention_dropout,
    )
    if int(config.dim * config.mlp_ratio) != ffn_dim:
        raise ValueError(f"encoder_ffn_embed_dim={ffn_dim} is not expressible as dim * mlp_ratio with dim={dim}")
    return config


class BEiT3Compat(MoMETransformer):
    """A beit3-layout ``MoMETransformer`` that is also callable like torchscale's ``BEiT3``.

    ``model(textual_tokens=None, visual_tokens=None, text_padding_position=None)`` returns a dict with
    ``"encoder_out"`` ``(B, N, D)`` (after ``output_projection`` when the source had one),
    ``"encoder_padding_mask"`` and ``"multiway_split_position"``, as torchscale does. ``attn_mask``,
    ``incremental_state`` and explicit ``positions`` are not supported (NotImplementedError).
    """

    def __init__(self, config: MoMEConfig, output_projection: bool = False):
        if config.layout != "beit3":
            raise ValueError(f"BEiT3Compat needs layout='beit3', got {config.layout!r}")
        super().__init__(config)
        self.output_projection = nn.Linear(config.dim, config.vocab_size, bias=False) if output_projection else None

    def forward(
        self,
        textual_tokens: Tensor | None = None,
        visual_tokens: Tensor | None = None,
        text_padding_position: Tensor | None = None,
        attn_mask: Tensor | None = None,
        vision_masked_position: Tensor | None = None,
        incremental_state=None,
        positions: Tensor | None = None,
    ) -> dict:
        if attn_mask is not None or incremental_state is not None or positions is not None:
            raise NotImplementedError("BEiT3Compat does not support attn_mask, incremental_state or positions")
        if textual_tokens is None and visual_tokens is None:
            raise ValueError("pass textual_tokens, visual_tokens or both")
        padding = None if text_padding_position is None else text_padding_position.bool()
        if textual_tokens is None:
            out = self.encode_image(visual_tokens, vision_masked_position)
            split, padding = -1, None
        elif visual_tokens is None:
            out = self.encode_text(textual_tokens, padding)
            split = 0
        else:
            out = self.encode_pair(visual_tokens, textual_tokens, padding, vision_masked_position)
            split = out.hidden.shape[1] - textual_tokens.shape[1]
            if padding is not None:
                image_pad = padding.new_zeros(padding.shape[0], split)
                padding = torch.cat([image_pad, padding], dim=1)
        hidden = out.hidden
        if padding is None:
            padding = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.output_projection is not None:
            hidden = self.output_projection(hidden)
        return {
            "encoder_out": hidden,
            "encoder_padding_mask": padding,
            "encoder_states": [],
            "l_aux": [None] * len(self.layers),
            "multiway_split_position": split,
        }


def from_beit3(model: nn.Module) -> BEiT3Compat:
    """A :class:`BEiT3Compat` with the weights of a torchscale ``BEiT3`` (same device, dtype and mode)."""
    if not (hasattr(model, "args") and hasattr(model, "encoder") and hasattr(model, "vision_embed")):
        raise TypeError(f"model must be a torchscale BEiT3 (with .args, .encoder, .vision_embed), got {type(model)}")
    config = config_from_args(model.args)
    reference = next(model.parameters())
    compat = BEiT3Compat(config, output_projection=model.encoder.output_projection is not None)
    compat = compat.to(device=reference.device, dtype=reference.dtype)
    compat.load_state_dict(model.state_dict())
    return compat.train(model.training)


# --- in-place patching ------------------------------------------------------------------------------------
def _stack(parameter_a: Tensor, parameter_b: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.stack([parameter_a.detach(), parameter_b.detach()]).clone())


def _multiway_linear(a: nn.Linear, b: nn.Linear) -> MultiwayLinear:
    layer = MultiwayLinear(a.in_features, a.out_features, 2, bias=a.bias is not None)
    layer.weight = _stack(a.weight, b.weight)
    if a.bias is not None:
        layer.bias = _stack(a.bias, b.bias)
    return layer


def _multiway_layer_norm(a: nn.LayerNorm, b: nn.LayerNorm) -> MultiwayLayerNorm:
    norm = MultiwayLayerNorm(a.normalized_shape[0], 2, a.eps)
    norm.weight, norm.bias = _stack(a.weight, b.weight), _stack(a.bias, b.bias)
    return norm


def _modality_ffn(a: nn.Module, b: nn.Module) -> ModalityFFN:
    activation = {F.gelu: "gelu", F.relu: "relu"}.get(a.activation_fn)
    if activation is None:
        raise ValueError(f"FeedForwardNetwork activation {a.activation_fn} has no mome equivalent (gelu, relu)")
    subln = a.ffn_layernorm is not None
    eps = a.ffn_layernorm.eps if subln else 1e-5
    ffn = ModalityFFN(a.fc1.in_features, a.fc1.out_features, 2, activation, subln=subln, eps=eps)
    ffn.dropout = a.dropout_module.p
    ffn.fc1, ffn.fc2 = _multiway_linear(a.fc1, b.fc1), _multiway_linear(a.fc2, b.fc2)
    if subln:
        ffn.ffn_layernorm = _multiway_layer_norm(a.ffn_layernorm, b.ffn_layernorm)
    return ffn


def _replacement(module: nn.Module) -> nn.Module | None:
    """mome's module for a torchscale MultiwayNetwork (not the position embeddings), or None."""
    if type(module).__name__ != "MultiwayNetwork":
        return None
    a, b = module.A, module.B
    if type(a) is nn.Linear:
        new = _multiway_linear(a, b)
    elif isinstance(a, nn.LayerNorm) and a.elementwise_affine and a.bias is not None:
        new = _multiway_layer_norm(a, b)
    elif type(a).__name__ == "FeedForwardNetwork":
        new = _modality_ffn(a, b)
    else:
        return None
    reference = a.weight if hasattr(a, "weight") else a.fc1.weight
    new = new.to(device=reference.device, dtype=reference.dtype)
    new.split_position = module.split_position
    return new


def _fused_attention_forward(
    self,
    query,
    key,
    value,
    incremental_state=None,
    key_padding_mask=None,
    attn_mask=None,
    rel_pos=None,
    is_first_step=False,
):
    """torchscale MultiheadAttention.forward on ``mome.ops.attention`` (its ``rel_pos`` as ``attn_bias``, its
    attention dropout as ``dropout_p``); falls back to the original for attn_mask, incremental decoding and xPos."""
    if attn_mask is not None or incremental_state is not None or self.xpos is not None:
        return super(type(self), self).forward(
            query, key, value, incremental_state, key_padding_mask, attn_mask, rel_pos, is_first_step
        )
    batch, tgt_len, dim = query.shape
    src_len = key.shape[1]
    heads, head_dim = self.num_heads, self.head_dim
    q = self.q_proj(query).reshape(batch, tgt_len, heads, head_dim).transpose(1, 2)
    k = self.k_proj(key).reshape(batch, src_len, heads, head_dim).transpose(1, 2)
    v = self.v_proj(value).reshape(batch, src_len, heads, head_dim).transpose(1, 2)
    padding = None if key_padding_mask is None else key_padding_mask.bool()
    bias = None if rel_pos is None else rel_pos.reshape(-1, heads, tgt_len, src_len)  # torchscale's (B·H, L, S)
    dropout_p = self.dropout_module.p if self.training else 0.0
    out = ops.attention(q, k, v, key_padding_mask=padding, scale=self.scaling, attn_bias=bias, dropout_p=dropout_p)
    out = out.transpose(1, 2).reshape(batch, tgt_len, dim)
    if self.inner_attn_ln is not None:
        out = self.inner_attn_ln(out)
    return self.out_proj(out), None


_FUSED_CLASSES: dict[type, type] = {}


def _fused_attention_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_attention_forward})
    return _FUSED_CLASSES[cls]


def patch(model: nn.Module) -> nn.Module:
    """Swap a torchscale model's layers for mome's, in place; returns the model.

    MultiwayNetwork(Linear / LayerNorm / FeedForwardNetwork) become MultiwayLinear / MultiwayLayerNorm /
    ModalityFFN (weights stacked, torchscale's ``set_split_position`` still drives them); each
    self-attention MultiheadAttention gets a forward on ``mome.ops.attention`` (same module, same
    attributes; the encoder's relative position bias reaches it as ``attn_bias``). The position embeddings
    stay as they are.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child)
            if new is not None:
                setattr(parent, name, new)
    for module in model.modules():
        cls = type(module)
        if cls.__name__ == "MultiheadAttention" and hasattr(module, "q_proj") and hasattr(module, "inner_attn_ln"):
            module.__class__ = _fused_attention_class(cls)
    return model


__all__ = ["BEiT3Compat", "config_from_args", "convert_state_dict", "from_beit3", "patch"]
