"""``generate(model, image, ...)``: open_clip's ``CoCa.generate`` with a KV cache (see ``_decoding.py``).

open_clip feeds the whole text so far through the text tower and the decoder for every new token; here each step
feeds one. Same arguments, defaults and token ids as open_clip's for ``generation_type="top_k"`` (``top_k=1`` is
greedy) and ``"top_p"``: the same logits processors (transformers' min-length, repetition penalty, top-k / top-p),
temperature, forced end-of-text at ``seq_len``, padding of finished rows, the window of the last ``max_seq_len``
tokens, ``stopping_criteria`` and ``fixed_output_length``; sampling draws from the global RNG in the same order.
``"beam_search"`` (see ``_beam.py``) gives the same ids as open_clip's beam search: the same transformers
``BeamSearchScorer``, beam groups, processors, length handling and padding, each beam feeding one token per step.
Models outside what the cache reproduces, and beam search on a model in training mode, run open_clip's own
``generate``, the reason logged.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from mome.integrations.open_clip._beam import cached_beam_search
from mome.integrations.open_clip._common import TALLY, causal_buffer
from mome.integrations.open_clip._decoding import CocaSteps

# open_clip's CoCa.generate keywords after (image, text), in its order, with its defaults
OPTIONS = {
    "seq_len": 30,
    "max_seq_len": 77,
    "temperature": 1.0,
    "generation_type": "beam_search",
    "top_p": 0.1,
    "top_k": 1,
    "pad_token_id": None,
    "eos_token_id": None,
    "sot_token_id": None,
    "num_beams": 6,
    "num_beam_groups": 3,
    "min_seq_len": 5,
    "stopping_criteria": None,
    "repetition_penalty": 1.0,
    "fixed_output_length": False,
}
GENERATION_TYPES = ("top_k", "top_p", "beam_search")
# open_clip's defaults: the start- and end-of-text ids of its CLIP tokenizer
SOT_TOKEN_ID, EOS_TOKEN_ID = 49406, 49407


def generate(model: nn.Module, image: Tensor, text: Tensor | None = None, *args, **options) -> Tensor:
    """Caption ids of ``image`` ``(B, 3, H, W)`` from an open_clip CoCa ``model``, as ``model.generate`` returns
    them, decoding with KV caches: per layer of the text tower and of the multimodal decoder, the causal
    self-attention's keys and values, and the cross-attention's image keys and values projected once; one new
    token per step through ``mome.ops.decode_attention``.

    ``text``: an optional prompt ``(B, L)`` or ``(L,)`` of ids (default: the start-of-text id alone). The other
    arguments are open_clip's, positionally or by name (see ``OPTIONS``). ``generation_type="beam_search"`` (the
    default, as in open_clip) ignores ``text``, ``max_seq_len``, ``temperature``, ``top_k`` and ``top_p``, as
    open_clip's does, and needs transformers' ``BeamSearchScorer`` (transformers < 5), as open_clip's does. Models
    the cache does not reproduce (see :func:`unsupported_reason`), and beam search on a model in training mode, run
    ``model``'s own ``generate``, the reason counted in ``TALLY.fallbacks`` and logged once.
    """
    given = _given_options(args, options)
    options = {**OPTIONS, **given}
    if not hasattr(model, "text_decoder") or not hasattr(model, "_encode_image"):
        raise TypeError(f"model must be an open_clip CoCa (text_decoder, _encode_image), got {type(model).__name__}")
    if options["generation_type"] not in GENERATION_TYPES:
        raise ValueError(f"generation_type must be one of {GENERATION_TYPES}, got {options['generation_type']!r}")
    if not options["seq_len"] > options["min_seq_len"]:
        raise ValueError(f"seq_len ({options['seq_len']}) must be larger than min_seq_len ({options['min_seq_len']})")
    reason = unsupported_reason(model)
    beam_search = options["generation_type"] == "beam_search"
    if reason is None and beam_search and model.training:
        reason = "beam_search on a model in training mode: open_clip's beam search stays in it (dropout live)"
    if reason is not None:
        TALLY.fell_back(reason)
        return _library_generate(model)(model, image, text, **given)
    with torch.no_grad():
        if beam_search:
            return _cached_beam_search(model, image, options)
        return _cached_generate(model, image, text, options)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the KV cache cannot reproduce ``model``'s captions, or None when it can."""
    from open_clip import transformer

    text, decoder = model.text, model.text_decoder
    if not isinstance(text, transformer.TextTransformer):
        return f"the text tower is a {type(text).__name__}, not open_clip's TextTransformer"
    if not isinstance(decoder, transformer.MultimodalTransformer):
        return f"the text decoder is a {type(decoder).__name__}, not open_clip's MultimodalTransformer"
    if text.attn_mask is None:
        return "a bidirectional text tower (no_causal_mask=True): each new token changes the earlier ones"
    if not causal_buffer(text.attn_mask) or not causal_buffer(decoder.attn_mask):
        return "an attn_mask buffer that is not the causal mask"
    blocks = [*text.transformer.resblocks, *decoder.resblocks, *decoder.cross_attn]
    for block in blocks:
        if not isinstance(block, transformer.ResidualAttentionBlock):
            return f"{type(block).__name__} blocks (open_clip's custom text blocks)"
        if block.attn.bias_k is not None or block.attn.add_zero_attn:
            return "attention with add_bias_kv or add_zero_attn"
    return None


def coca_generate(self, image: Tensor, text: Tensor | None = None, *args, **options) -> Tensor:
    """``CoCa.generate`` as :func:`patch` installs it: :func:`generate` on this model."""
    return generate(self, image, text, *args, **options)


def _given_options(args: tuple, options: dict) -> dict:
    """The options the caller set, positionally (in open_clip's order) or by name."""
    names = list(OPTIONS)
    if len(args) > len(names):
        raise TypeError(f"generate takes at most {len(names) + 3} positional arguments, got {len(args) + 3}")
    given = dict(zip(names, args, strict=False))
    repeated = sorted(set(given) & set(options))
    unknown = sorted(set(options) - set(names))
    if repeated or unknown:
        raise TypeError(f"generate got {'repeated' if repeated else 'unknown'} arguments {repeated or unknown}")
    return {**given, **options}


def _library_generate(model: nn.Module):
    """``model``'s own generate method (the class's, skipping the one ``patch`` installs)."""
    for cls in type(model).__mro__:
        method = cls.__dict__.get("generate")
        if method is not None and method is not coca_generate:
            return method
    raise TypeError(f"model ({type(model).__name__}) has no generate method to fall back on")


def _token_id(name: str, value, default: int) -> int:
    value = default if value is None else value
    if isinstance(value, Tensor | list | tuple):
        flat = torch.as_tensor(value).reshape(-1)
        if flat.numel() != 1:
            raise ValueError(f"{name} must be one token id, got {flat.numel()} of them")
        value = flat.item()
    return int(value)


def _processors(options: dict, eos: int, device: torch.device):
    try:
        import transformers
    except ImportError as error:
        raise ImportError("CoCa generation needs transformers' logits processors: pip install transformers") from error
    processors = transformers.LogitsProcessorList(
        [
            transformers.MinLengthLogitsProcessor(options["min_seq_len"], torch.tensor([eos], device=device)),
            transformers.RepetitionPenaltyLogitsProcessor(options["repetition_penalty"]),
        ]
    )
    warper = None  # beam search has none
    if options["generation_type"] == "top_p":
        warper = transformers.TopPLogitsWarper(options["top_p"])
    elif options["generation_type"] == "top_k":
        warper = transformers.TopKLogitsWarper(options["top_k"])
    criteria = options["stopping_criteria"]
    if criteria is None:
        criteria = [transformers.MaxLengthCriteria(max_length=options["seq_len"])]
    return processors, warper, transformers.StoppingCriteriaList(criteria)


def _capacity(model: nn.Module, max_seq_len: int) -> int:
    """The most text tokens one step sees: the window, and what the towers take (positions; the CLS slot)."""
    text = model.text
    positions = text.positional_embedding.shape[0] - (text.cls_emb is not None)
    return max(1, min(max_seq_len, positions, model.text_decoder.attn_mask.shape[0]))


def _cached_beam_search(model: nn.Module, image: Tensor, options: dict) -> Tensor:
    eos = _token_id("eos_token_id", options["eos_token_id"], EOS_TOKEN_ID)
    pad = _token_id("pad_token_id", options["pad_token_id"], model.pad_id)
    processors, _, stopping = _processors(options, eos, image.device)
    out = cached_beam_search(
        model,
        image,
        processors,
        stopping,
        sot=_token_id("sot_token_id", options["sot_token_id"], SOT_TOKEN_ID),
        eos=eos,
        pad=pad,
        num_beams=options["num_beams"],
        num_beam_groups=options["num_beam_groups"],
        # no window: the caption grows to seq_len, or as far as the caller's stopping criteria let it
        capacity=_capacity(model, options["seq_len"] if options["stopping_criteria"] is None else sys.maxsize),
        tally=TALLY,
    )
    missing = options["seq_len"] - out.shape[1]
    if options["fixed_output_length"] and missing > 0:
        out = torch.cat([out, out.new_full((out.shape[0], missing), pad)], dim=1)
    return out


def _cached_generate(model: nn.Module, image: Tensor, text: Tensor | None, options: dict) -> Tensor:
    sot = _token_id("sot_token_id", options["sot_token_id"], SOT_TOKEN_ID)
    eos = _token_id("eos_token_id", options["eos_token_id"], EOS_TOKEN_ID)
    pad = _token_id("pad_token_id", options["pad_token_id"], model.pad_id)
    processors, warper, stopping = _processors(options, eos, image.device)
    seq_len, max_seq_len = options["seq_len"], options["max_seq_len"]
    _, image_embs = model._encode_image(image)  # before eval(), as open_clip does
    batch = image.shape[0]
    out = torch.full((batch, 1), sot, dtype=torch.long, device=image.device) if text is None else text
    squeeze = out.dim() == 1
    out = out[None] if squeeze else out
    if out.dim() != 2 or out.shape[0] != batch or out.shape[1] == 0:
        raise ValueError(f"text must be token ids (B, L) or (L,) with B = {batch} images and L >= 1, got {text.shape}")
    was_training = model.training
    model.eval()
    try:
        capacity = _capacity(model, max_seq_len)
        steps = CocaSteps(model, image_embs, capacity, TALLY)
        window_start = 0
        while True:
            start = max(0, out.shape[1] - max_seq_len)
            x = out[:, start:]  # [B, L]
            live = (out[:, -1] != eos) & (out[:, -1] != pad)
            sample = torch.full((out.shape[0], 1), pad, dtype=torch.long, device=out.device)
            if live.any():
                if x.shape[1] > capacity:  # open_clip fails here too, on a shape mismatch
                    raise ValueError(
                        f"the caption reached {x.shape[1]} tokens, more than this CoCa takes ({capacity}: its text "
                        "positions and decoder context); lower seq_len or max_seq_len"
                    )
                if start != window_start:  # the window slid: every position moved
                    steps.reset()
                    window_start = start
                logits = steps.feed(x)[live]  # [live, V]
                scores = warper(x[live], processors(x[live], logits))
                probs = torch.softmax(scores / options["temperature"], dim=-1)
                if x.shape[1] + 1 == seq_len:
                    sample[live] = eos
                else:
                    sample[live] = torch.multinomial(probs, 1)
            elif not options["fixed_output_length"]:
                break
            out = torch.cat([out, sample], dim=-1)
            if bool(torch.as_tensor(stopping(out, None)).all()):
                break
    finally:
        model.train(was_training)
    return out[0] if squeeze else out
