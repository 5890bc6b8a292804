"""open_clip's CoCa beam search (``CoCa._generate_beamsearch``) on the KV caches of ``_decoding.CocaSteps``.

The same loop as open_clip's, driving the same transformers ``BeamSearchScorer`` and logits processors: per step
the logits of every beam, then group by group the processors, the ``2 · group_size`` best continuations per image,
the scorer's choice of beams and the rows reordered by it; the returned ids are the scorer's ``finalize``. open_clip
feeds each beam's whole text through the model every step; here each beam feeds its one new token and the text
caches follow the chosen beams (``CocaSteps.reorder``: ``index_select`` on the image·beam rows).

As in open_clip: the scores are the processed logits summed along the beam (no log-softmax), the groups get no
diversity penalty (its processor list has none), a prompt ``text`` is ignored (the beams start from the
start-of-text id), and there is no ``max_seq_len`` window. When the scorer marks an image's group done it points
that group's beams at the first image's first beam of the group: their text is then another image's (in open_clip
as here; here the decoder's cached keys were also computed against the other image), and nothing reads their
logits again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mome.integrations._tally import Tally
from mome.integrations.open_clip._decoding import CocaSteps


def beam_search_scorer() -> type:
    """transformers' ``BeamSearchScorer``, taken where open_clip's beam search takes it."""
    from open_clip import coca_model

    scorer = getattr(coca_model, "BeamSearchScorer", None)
    if scorer is not None:
        return scorer
    for module in ("transformers", "transformers.generation"):  # open_clip's two places for it
        scorer = getattr(__import__(module, fromlist=["BeamSearchScorer"]), "BeamSearchScorer", None)
        if scorer is not None:
            return scorer
    raise ImportError(
        "generation_type='beam_search' needs transformers' BeamSearchScorer, which transformers 5 removed (open_clip's "
        "own beam search needs it too): install transformers<5, or use generation_type='top_k' or 'top_p'"
    )


def cached_beam_search(
    model: nn.Module,
    image: Tensor,
    processors,
    stopping,
    *,
    sot: int,
    eos: int,
    pad: int,
    num_beams: int,
    num_beam_groups: int,
    capacity: int,
    tally: Tally,
) -> Tensor:
    """The ids open_clip's ``_generate_beamsearch`` returns for ``image`` ``(B, 3, H, W)``: one row per image.

    ``processors``: the logits processors (min length, repetition penalty); ``stopping``: the stopping criteria;
    ``capacity``: the most text tokens the caches hold (a longer caption raises, as open_clip fails on it).
    """
    device, batch = image.device, image.shape[0]
    scorer = beam_search_scorer()(batch_size=batch, num_beams=num_beams, device=device, num_beam_groups=num_beam_groups)
    group_size = num_beams // num_beam_groups
    _, image_embs = model._encode_image(image)  # once per image; open_clip encodes each image once per beam
    steps = CocaSteps(model, image_embs.repeat_interleave(num_beams, 0), capacity, tally)
    eos_ids = torch.tensor([eos], device=device)
    ids = torch.full((batch * num_beams, 1), sot, dtype=torch.long, device=device)
    # the first beam of each group starts at 0, the others out of reach, so a group's beams do not start equal
    scores = torch.full((batch, num_beams), -1e9, dtype=torch.float, device=device)
    scores[:, ::group_size] = 0
    scores = scores.view(-1)
    # rows[b, g]: the rows of image b's group g; a group's rows over all images, image-major, as open_clip takes them
    rows = torch.arange(batch * num_beams, device=device).view(batch, num_beam_groups, group_size)
    while True:
        if ids.shape[1] > capacity:  # open_clip fails here too, on a shape mismatch
            raise ValueError(
                f"the caption reached {ids.shape[1]} tokens, more than this CoCa takes ({capacity}: its text positions "
                "and decoder context); lower seq_len"
            )
        logits = steps.feed(ids)  # [B·beams, V]
        vocab = logits.shape[-1]
        tokens = torch.zeros(batch * num_beams, dtype=torch.long, device=device)
        order = torch.zeros(batch * num_beams, dtype=torch.long, device=device)
        for group in range(num_beam_groups):
            members = rows[:, group].reshape(-1)
            group_ids = ids[members]
            processed = processors(group_ids, logits[members], current_tokens=tokens, beam_group_idx=group)
            candidates = (processed + scores[members, None]).view(batch, group_size * vocab)
            top_scores, top = torch.topk(candidates, 2 * group_size, dim=1, largest=True, sorted=True)
            top_beams, top_tokens = torch.div(top, vocab, rounding_mode="floor"), top % vocab
            chosen = scorer.process(
                group_ids,
                top_scores,
                top_tokens,
                top_beams,
                pad_token_id=pad,
                eos_token_id=eos_ids,
                beam_indices=None,
                group_index=group,
            )
            beams = chosen["next_beam_indices"]  # into group_ids: image · group_size + beam
            scores[members] = chosen["next_beam_scores"]
            ids[members] = group_ids[beams]
            tokens[members] = chosen["next_beam_tokens"]
            order[members] = members[beams]
        ids = torch.cat([ids, tokens[:, None]], dim=-1)
        if scorer.is_done or all(stopping(ids, None)):
            break
        steps.reorder(order)
    return scorer.finalize(
        ids,
        scores,
        top_tokens,
        top_beams,
        pad_token_id=pad,
        eos_token_id=eos_ids,
        max_length=stopping.max_length,
        beam_indices=None,
    )["sequences"]
