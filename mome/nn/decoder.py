"""A BLIP / CoCa style caption decoder: causal self-attention, cross-attention to image tokens, FFN, LM head.

Training runs the whole caption at once (``mome.ops.attention`` with ``causal=True``); ``generate``
decodes one token per step against a KV cache (``mome.ops.decode_attention``), with the
cross-attention keys and values of the image tokens projected once before the first step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops
from mome.nn._heads import merge_heads, split_heads
from mome.ops._validate import check_ids, is_int, is_real

STRATEGIES = ("greedy", "sample")


class CaptionDecoderLayer(nn.Module):
    """Pre-norm block: x + SelfAttn(LN(x)) (causal), x + CrossAttn(LN(x), image), x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden_dim: int, image_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(image_dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def image_kv(self, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values ``(B, H, M, Dh)`` of the image tokens ``(B, M, image_dim)``."""
        k, v = self.cross_kv(image_tokens).chunk(2, dim=-1)
        return split_heads(k, self.heads).contiguous(), split_heads(v, self.heads).contiguous()

    def ffn(self, x: Tensor) -> Tensor:
        """``fc2(gelu(fc1(x)))`` through ``mome.ops.modality_ffn`` with one expert (fused bias + GELU on GPU)."""
        tokens = x.reshape(-1, x.shape[-1])  # [T, D]
        one_expert = torch.zeros(tokens.shape[0], dtype=torch.int64, device=x.device)
        out = ops.modality_ffn(
            tokens,
            one_expert,
            self.fc1.weight.unsqueeze(0),
            self.fc1.bias.unsqueeze(0),
            self.fc2.weight.unsqueeze(0),
            self.fc2.bias.unsqueeze(0),
            activation="gelu",
        )
        return out.view(x.shape)

    def forward(self, x: Tensor, image_k: Tensor, image_v: Tensor, image_padding_mask: Tensor | None) -> Tensor:
        """``x`` ``(B, L, D)`` text states; ``image_k``/``image_v`` from :meth:`image_kv`."""
        q, k, v = (split_heads(t, self.heads) for t in self.self_qkv(self.norm1(x)).chunk(3, dim=-1))
        x = x + self.self_out(merge_heads(ops.attention(q, k, v, causal=True)))
        q = split_heads(self.cross_q(self.norm2(x)), self.heads)
        attended = ops.attention(q, image_k, image_v, key_padding_mask=image_padding_mask)
        x = x + self.cross_out(merge_heads(attended))
        return x + self.ffn(self.norm3(x))

    def step(
        self,
        x: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        position: int,
        image_k: Tensor,
        image_v: Tensor,
        image_padding_mask: Tensor | None,
    ) -> Tensor:
        """One new token ``x`` ``(B, D)`` at ``position``: writes its key/value into the caches ``(B, H, Nmax, Dh)``."""
        batch, dim = x.shape
        q, k, v = (t.view(batch, self.heads, dim // self.heads) for t in self.self_qkv(self.norm1(x)).chunk(3, dim=-1))
        k_cache[:, :, position] = k
        v_cache[:, :, position] = v
        seqlens = torch.full((batch,), position + 1, dtype=torch.int32, device=x.device)
        x = x + self.self_out(ops.decode_attention(q, k_cache, v_cache, seqlens).reshape(batch, dim))
        q = self.cross_q(self.norm2(x)).view(batch, self.heads, dim // self.heads)
        if image_padding_mask is None:  # every image token is valid: the image K/V act as a full cache
            image_tokens = torch.full((batch,), image_k.shape[2], dtype=torch.int32, device=x.device)
            attended = ops.decode_attention(q, image_k, image_v, image_tokens)
        else:
            attended = ops.attention(q.unsqueeze(2), image_k, image_v, key_padding_mask=image_padding_mask)
        x = x + self.cross_out(attended.reshape(batch, dim))
        return x + self.ffn(self.norm3(x))


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the nucleus of mass ``top_p``.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token always stays). ``logits``: ``(B, V)``.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class CaptionDecoder(nn.Module):
    """Autoregressive caption decoder over image tokens (BLIP's image-grounded decoder, CoCa's multimodal decoder).

    Text is right-padded ``(B, L)`` int64 starting with a bos token; the causal mask keeps every
    position from seeing the padding after it, and :meth:`loss` ignores targets equal to ``pad_id``.
    Image tokens ``(B, M, image_dim)`` are e.g. an encoder's final hidden states; ``image_padding_mask``
    ``(B, M)`` bool marks tokens to ignore (True = pad). The LM head shares the token embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4,
        max_len: int = 64,
        image_dim: int | None = None,
        pad_id: int = 0,
        label_smoothing: float = 0.0,
        eps: float = 1e-6,
        image_tokens: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2 (bos and one token), got {max_len!r}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must lie in [0, vocab_size={vocab_size}), got {pad_id}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if image_tokens is not None and (not isinstance(image_tokens, int) or image_tokens < 1):
            raise ValueError(f"image_tokens must be None or a positive int, got {image_tokens!r}")
        self.vocab_size, self.dim, self.heads, self.max_len = vocab_size, dim, heads, max_len
        self.image_dim = dim if image_dim is None else image_dim
        self.pad_id, self.label_smoothing = pad_id, label_smoothing
        self.image_tokens = image_tokens
        # where each image token sits, learned by the decoder itself: the encoder's top states need not keep it
        self.image_pos_embed = None if image_tokens is None else nn.Parameter(torch.zeros(image_tokens, self.image_dim))
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(max_len, dim))
        hidden = int(dim * mlp_ratio)
        self.layers = nn.ModuleList(CaptionDecoderLayer(dim, heads, hidden, self.image_dim, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.lm_head = nn.Linear(dim, vocab_size)
        self.lm_head.weight = self.token_embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.image_pos_embed is not None:
            nn.init.trunc_normal_(self.image_pos_embed, std=0.02)

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, dim={self.dim}, heads={self.heads}, max_len={self.max_len}, "
            f"image_dim={self.image_dim}, pad_id={self.pad_id}, label_smoothing={self.label_smoothing}, "
            f"image_tokens={self.image_tokens}"
        )

    # -- checks ---------------------------------------------------------------------------------
    def _check_image(self, image_tokens: Tensor, image_padding_mask: Tensor | None) -> None:
        if not isinstance(image_tokens, Tensor) or not image_tokens.is_floating_point() or image_tokens.dim() != 3:
            got = (
                f"{tuple(image_tokens.shape)} {image_tokens.dtype}"
                if isinstance(image_tokens, Tensor)
                else image_tokens
            )
            raise TypeError(f"image_tokens must be a float tensor (B, M, image_dim), got {got}")
        if image_tokens.shape[-1] != self.image_dim or image_tokens.shape[1] == 0:
            raise ValueError(f"image_tokens must be (B, M >= 1, {self.image_dim}), got {tuple(image_tokens.shape)}")
        weight = self.token_embed.weight
        if image_tokens.device != weight.device:
            raise ValueError(
                f"image_tokens must be on the decoder's device {weight.device}, got {tuple(image_tokens.shape)} "
                f"on {image_tokens.device}"
            )
        if image_tokens.dtype != weight.dtype and not torch.is_autocast_enabled(image_tokens.device.type):
            raise TypeError(
                f"image_tokens must have the decoder's dtype {weight.dtype} (or run under torch.autocast), "
                f"got {image_tokens.dtype}"
            )
        if self.image_tokens is not None and image_tokens.shape[1] != self.image_tokens:
            raise ValueError(
                f"image_tokens must have M = {self.image_tokens} tokens (the decoder's image positions), "
                f"got {tuple(image_tokens.shape)}"
            )
        if image_padding_mask is not None:
            if not isinstance(image_padding_mask, Tensor) or image_padding_mask.dtype != torch.bool:
                raise TypeError(f"image_padding_mask must be a bool tensor (True = pad), got {image_padding_mask!r}")
            if image_padding_mask.shape != image_tokens.shape[:2]:
                raise ValueError(
                    f"image_padding_mask must be (B, M) = {tuple(image_tokens.shape[:2])}, "
                    f"got {tuple(image_padding_mask.shape)}"
                )

    def _check_text(self, text_ids: Tensor, batch: int) -> None:
        if not isinstance(text_ids, Tensor) or text_ids.dtype not in (torch.int64, torch.int32) or text_ids.dim() != 2:
            got = f"{tuple(text_ids.shape)} {text_ids.dtype}" if isinstance(text_ids, Tensor) else text_ids
            raise TypeError(f"text_ids must be an int64 tensor (B, L), got {got}")
        if text_ids.shape[0] != batch or not 1 <= text_ids.shape[1] <= self.max_len:
            raise ValueError(
                f"text_ids must be (B={batch}, 1 <= L <= max_len={self.max_len}), got {tuple(text_ids.shape)}"
            )
        if text_ids.device != self.token_embed.weight.device:
            raise ValueError(f"text_ids must be on the decoder's device {self.token_embed.weight.device}, "
                             f"got {text_ids.device}")  # fmt: skip
        # one host sync; skipped under torch.compile and with MOME_CHECK_IDS=0
        check_ids("text_ids", text_ids, self.vocab_size, f"token ids of vocab_size = {self.vocab_size}")

    # -- training -------------------------------------------------------------------------------
    def image_kv(self, image_tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's cross-attention keys and values, computed once per image."""
        if self.image_pos_embed is not None:
            image_tokens = image_tokens + self.image_pos_embed.to(image_tokens.dtype)
        return [layer.image_kv(image_tokens) for layer in self.layers]

    def forward(self, text_ids: Tensor, image_tokens: Tensor, image_padding_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``(B, L, V)``: position i predicts token i + 1 from tokens 0..i and the image."""
        self._check_image(image_tokens, image_padding_mask)
        self._check_text(text_ids, image_tokens.shape[0])
        length = text_ids.shape[1]
        x = self.token_embed(text_ids) + self.pos_embed[:length]  # [B, L, D]
        for layer, (image_k, image_v) in zip(self.layers, self.image_kv(image_tokens), strict=True):
            x = layer(x, image_k, image_v, image_padding_mask)
        return self.lm_head(self.norm(x))

    def loss(
        self,
        text_ids: Tensor,
        image_tokens: Tensor,
        image_padding_mask: Tensor | None = None,
        label_smoothing: float | None = None,
    ) -> Tensor:
        """Mean next-token cross-entropy over targets that are not ``pad_id`` (BLIP's LM loss).

        ``label_smoothing`` overrides the constructor's value (BLIP uses 0.1).
        """
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {smoothing}")
        if text_ids.dim() != 2 or text_ids.shape[1] < 2:
            raise ValueError(
                f"loss needs text_ids (B, L >= 2): an input token and its target, got {tuple(text_ids.shape)}"
            )
        logits = self(text_ids[:, :-1], image_tokens, image_padding_mask)  # [B, L-1, V]
        targets = text_ids[:, 1:]
        at_least_fp32 = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(
            logits.reshape(-1, self.vocab_size).to(at_least_fp32),
            targets.reshape(-1),
            ignore_index=self.pad_id,
            label_smoothing=smoothing,
        )

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        image_tokens: Tensor,
        max_new_tokens: int,
        bos_id: int,
        eos_id: int,
        strategy: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        image_padding_mask: Tensor | None = None,
        use_cache: bool = True,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Decode captions token by token, starting from ``bos_id``.

        Returns ids ``(B, T)`` int64 with ``T <= max_new_tokens + 1`` (bos first); after a sequence emits
        ``eos_id`` it is padded with ``pad_id``, and decoding stops once every sequence has ended: an empty
        batch (``B = 0``) or ``max_new_tokens=0`` returns the bos column ``(B, 1)`` (and ``(B, 0, V)`` logits).
        ``strategy="sample"`` draws from ``softmax(logits / temperature)`` restricted to ``top_k`` /
        ``top_p`` with ``generator`` (reproducible). ``use_cache=False`` recomputes the whole prefix
        every step (the check that the KV cache changes nothing). ``return_logits=True`` also
        returns the ``(B, T - 1, V)`` logits each step chose from, before temperature and filtering.
        """
        self._check_generate_args(max_new_tokens, bos_id, eos_id, strategy, temperature, top_k, top_p)
        self._check_image(image_tokens, image_padding_mask)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")
            if strategy == "sample" and generator.device.type != image_tokens.device.type:
                raise ValueError(
                    f"generator must be on image_tokens' device ({image_tokens.device.type}) to sample there, "
                    f"got a generator on {generator.device}"
                )
        batch, device = image_tokens.shape[0], image_tokens.device
        image_kv = self.image_kv(image_tokens)
        ids = torch.full((batch, 1), bos_id, dtype=torch.int64, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        caches = []
        if use_cache:
            shape = (batch, self.heads, max_new_tokens + 1, self.dim // self.heads)
            dtype = self.token_embed.weight.dtype
            caches = [(image_tokens.new_zeros(shape, dtype=dtype), image_tokens.new_zeros(shape, dtype=dtype))]
            caches += [(torch.zeros_like(caches[0][0]), torch.zeros_like(caches[0][0])) for _ in self.layers[1:]]
        step_logits = []
        for position in range(max_new_tokens):
            if bool(finished.all()):  # every sequence has ended (at once for an empty batch)
                break
            if use_cache:
                x = self.token_embed(ids[:, -1]) + self.pos_embed[position]  # [B, D]
                for layer, (k_cache, v_cache), (image_k, image_v) in zip(self.layers, caches, image_kv, strict=True):
                    x = layer.step(x, k_cache, v_cache, position, image_k, image_v, image_padding_mask)
                logits = self.lm_head(self.norm(x))  # [B, V]
            else:
                logits = self(ids, image_tokens, image_padding_mask)[:, -1]
            step_logits.append(logits)
            next_ids = self._choose(logits, strategy, temperature, top_k, top_p, generator)
            next_ids = next_ids.masked_fill(finished, self.pad_id)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            finished |= next_ids == eos_id
        if return_logits:
            if not step_logits:  # no step ran: (B, 0, V) in the dtype the LM head gives
                return ids, self.lm_head(self.norm(self.token_embed(ids[:, :0])))
            return ids, torch.stack(step_logits, dim=1)
        return ids

    @staticmethod
    def _choose(logits, strategy, temperature, top_k, top_p, generator) -> Tensor:
        if strategy == "greedy":
            return logits.argmax(dim=-1)
        filtered = filter_logits(logits.float() / temperature, top_k, top_p)
        probs = filtered.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def _check_generate_args(self, max_new_tokens, bos_id, eos_id, strategy, temperature, top_k, top_p) -> None:
        if not is_int(max_new_tokens) or not 0 <= max_new_tokens < self.max_len:
            raise ValueError(
                f"max_new_tokens must be an int in [0, max_len - 1 = {self.max_len - 1}] (bos takes one position), "
                f"got {max_new_tokens!r}"
            )
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not is_int(value) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be an int in [0, vocab_size={self.vocab_size}), got {value!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not is_real(temperature) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if top_k is not None and (not is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and (not is_real(top_p) or not 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
