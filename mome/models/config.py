"""MoMEConfig and the named model sizes (VLMo and BEiT-3, base / large / tiny)."""

from __future__ import annotations

from dataclasses import dataclass, replace

LAYOUTS = ("vlmo", "beit3")
RELATIVE_POSITIONS = (None, "vlmo", "buckets")


@dataclass(frozen=True)
class MoMEConfig:
    """Sizes and layout of a MoME transformer.

    layout: ``"vlmo"`` (shared attention, fused order text then image, eps 1e-6, layer scale) or
        ``"beit3"`` (torchscale: everything per-token multiway, order image then text, eps 1e-5).
    num_experts: FFN experts in the VL layers: 3 (vision, language, vision-language) or 2 (no VL expert).
    vl_layers: how many top layers send fused image-text input through the VL-FFN (needs num_experts=3);
        the layers below use the V / L FFN by position.
    max_text_len: the longest text (the rows of the absolute text position table, when there is one).
    subln: BEiT-3 layout only: torchscale's sub-LayerNorms (before out_proj, after the FFN activation).
    relative_position: a learned bias added to every layer's attention scores. ``"vlmo"``: VLMo's table
        (BEiT's 2-D image offsets, 1-D text offsets, text<->image entries; one table holding every layer's
        heads; needs layout="vlmo"); ``"buckets"``: torchscale's T5-style bucketed 1-D bias over the token
        sequence, one for all layers (``rel_pos_buckets`` buckets, ``max_rel_pos`` longest distance); None.
    rel_pos_text_len: the longest text VLMo's table covers (its ``max_text_len_of_initckpt``, 196 in the
        released checkpoints); None: max_text_len.
    absolute_position: learned absolute position embeddings (VLMo with its relative bias has none).
    attention_dropout: dropout on the attention probabilities, in training only.
    """

    layout: str = "vlmo"
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 30522
    max_text_len: int = 40
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_experts: int = 3
    vl_layers: int = 2
    layer_scale_init: float | None = 0.1
    eps: float = 1e-6
    dropout: float = 0.0
    drop_path: float = 0.0
    subln: bool = True
    activation: str = "gelu"
    relative_position: str | None = None
    rel_pos_text_len: int | None = None
    rel_pos_buckets: int = 32
    max_rel_pos: int = 128
    absolute_position: bool = True
    attention_dropout: float = 0.0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("dim", "depth", "heads", "vocab_size", "max_text_len", "image_size", "patch_size", "in_chans"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.num_experts not in (2, 3):
            raise ValueError(f"num_experts must be 2 (V, L) or 3 (V, L, VL), got {self.num_experts}")
        if not 0 <= self.vl_layers <= self.depth:
            raise ValueError(f"vl_layers must lie in [0, depth={self.depth}], got {self.vl_layers}")
        if self.vl_layers > 0 and self.num_experts != 3:
            raise ValueError(f"vl_layers={self.vl_layers} needs num_experts=3 (a vision-language expert)")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"dropout and drop_path must lie in [0, 1), got {self.dropout} and {self.drop_path}")
        if not 0.0 <= self.attention_dropout <= 1.0:
            raise ValueError(f"attention_dropout must lie in [0, 1], got {self.attention_dropout}")
        self._check_relative_position()

    def _check_relative_position(self) -> None:
        if self.relative_position not in RELATIVE_POSITIONS:
            raise ValueError(f"relative_position must be one of {RELATIVE_POSITIONS}, got {self.relative_position!r}")
        if self.relative_position == "vlmo" and self.layout != "vlmo":
            raise ValueError("relative_position='vlmo' needs layout='vlmo' (its pair index puts the text first)")
        if self.rel_pos_text_len is not None:
            text_len = self.rel_pos_text_len
            if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < self.max_text_len:
                raise ValueError(
                    f"rel_pos_text_len must be an int >= max_text_len = {self.max_text_len} (the longest text the "
                    f"relative position table covers), got {text_len!r}"
                )
        if self.relative_position == "buckets":
            if self.rel_pos_buckets < 4 or self.max_rel_pos <= self.rel_pos_buckets // 4:
                raise ValueError(
                    f"relative_position='buckets' needs rel_pos_buckets >= 4 and max_rel_pos > rel_pos_buckets // 4, "
                    f"got {self.rel_pos_buckets} and {self.max_rel_pos}"
                )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def replace(self, **overrides) -> MoMEConfig:
        return replace(self, **overrides)


def vlmo_base(**overrides) -> MoMEConfig:
    """VLMo-Base: 12 layers of 768, VL-FFN in the top 2 layers, layer scale 0.1, VLMo's relative position
    bias (text table of 196 tokens) and no absolute positions."""
    return _vlmo(dim=768, depth=12, heads=12, vl_layers=2, layer_scale_init=0.1).replace(**overrides)


def vlmo_large(**overrides) -> MoMEConfig:
    """VLMo-Large: 24 layers of 1024, VL-FFN in the top 3 layers, layer scale 1e-5, relative position bias."""
    return _vlmo(dim=1024, depth=24, heads=16, vl_layers=3, layer_scale_init=1e-5).replace(**overrides)


def _vlmo(**sizes) -> MoMEConfig:
    # VLMo-Base/Large (vlmo_base_patch16 / vlmo_large_patch16): relative position bias in every layer, no
    # absolute position embeddings, a text table sized by max_text_len_of_initckpt = 196.
    return MoMEConfig(layout="vlmo", relative_position="vlmo", rel_pos_text_len=196, absolute_position=False, **sizes)


def _beit3(dim: int, depth: int, heads: int) -> MoMEConfig:
    # torchscale's BEiT3 (the released checkpoints): two experts (A = vision, B = language) in every
    # layer, text positions from its 1024-entry table less the two fairseq offsets.
    return MoMEConfig(
        layout="beit3",
        dim=dim,
        depth=depth,
        heads=heads,
        vocab_size=64010,
        max_text_len=1022,
        num_experts=2,
        vl_layers=0,
        layer_scale_init=None,
        eps=1e-5,
    )


def beit3_base(**overrides) -> MoMEConfig:
    """BEiT-3 base as torchscale builds it: 12 layers of 768, V and L experts everywhere."""
    return _beit3(768, 12, 12).replace(**overrides)


def beit3_large(**overrides) -> MoMEConfig:
    """BEiT-3 large: 24 layers of 1024."""
    return _beit3(1024, 24, 16).replace(**overrides)


def vlmo_tiny(**overrides) -> MoMEConfig:
    """A tiny VLMo for tests and the demo: 4 layers of 64, 32x32 images in 8x8 patches, VL-FFN in the
    top 2 layers (in every layer when ``depth`` < 2 is asked for); VLMo's relative position bias."""
    overrides.setdefault("vl_layers", min(2, overrides.get("depth", 4)))
    config = MoMEConfig(
        layout="vlmo",
        dim=64,
        depth=4,
        heads=4,
        vocab_size=128,
        max_text_len=16,
        image_size=32,
        patch_size=8,
        vl_layers=2,
        layer_scale_init=0.1,
        relative_position="vlmo",
        absolute_position=False,
    )
    return config.replace(**overrides)


def beit3_tiny(**overrides) -> MoMEConfig:
    """A tiny BEiT-3 layout for tests: 2 layers of 64."""
    config = _beit3(64, 2, 4).replace(vocab_size=128, max_text_len=16, image_size=32, patch_size=8)
    return config.replace(**overrides)
