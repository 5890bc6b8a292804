"""A stand-in for transformers' ``BeamSearchScorer``, for the CoCa beam search tests only, used only when the real
one cannot be imported (transformers 5 removed it; open_clip's beam search and mome's cached one both need it).

Both loops under test drive the scorer the same way, so any scorer with its interface checks that the cached loop
reproduces open_clip's; this one keeps transformers 4's rules for the settings open_clip uses (length penalty 1,
no early stopping, one caption kept per image) so the ids are also the ones transformers 4 gives: a finished
caption scores its summed scores over its length (the end-of-text counted), each (image, group) keeps its
``group_size`` best, and it is done once no open beam can beat the worst of them.
"""

from __future__ import annotations

from collections import UserDict

import torch


class _Finished:
    """The ``size`` best finished captions of one (image, group): ``(score, ids)`` in the order they came."""

    def __init__(self, size: int):
        self.size, self.captions, self.worst = size, [], 1e9

    def add(self, ids: torch.Tensor, total: float, length: int) -> None:
        score = total / length
        if len(self.captions) < self.size or score > self.worst:
            self.captions.append((score, ids))
            if len(self.captions) > self.size:
                ranked = sorted(range(len(self.captions)), key=lambda i: self.captions[i][0])  # ties: oldest first
                self.worst = self.captions[ranked[1]][0]
                del self.captions[ranked[0]]
            else:
                self.worst = min(self.worst, score)

    def done(self, best_total: float, length: int) -> bool:
        return len(self.captions) >= self.size and self.worst >= best_total / length


class BeamSearchScorer:
    def __init__(self, batch_size: int, num_beams: int, device: torch.device, num_beam_groups: int = 1):
        if not isinstance(num_beams, int) or num_beams <= 1:
            raise ValueError(f"num_beams must be an integer larger than 1, got {num_beams}")
        if not isinstance(num_beam_groups, int) or num_beam_groups > num_beams or num_beams % num_beam_groups:
            raise ValueError(f"num_beam_groups ({num_beam_groups}) must divide num_beams ({num_beams})")
        self.num_beams, self.num_beam_groups, self.device = num_beams, num_beam_groups, device
        self.group_size = num_beams // num_beam_groups
        self._beam_hyps = [_Finished(self.group_size) for _ in range(batch_size * num_beam_groups)]  # image-major
        self._done = [False] * len(self._beam_hyps)

    @property
    def is_done(self) -> bool:
        return all(self._done)

    def process(
        self, input_ids, next_scores, next_tokens, next_indices, pad_token_id, eos_token_id, beam_indices, group_index
    ):
        assert beam_indices is None, "the stand-in does not track beam indices"
        length = input_ids.shape[-1] + 1
        images, size = len(self._beam_hyps) // self.num_beam_groups, self.group_size
        scores = next_scores.new_zeros(images, size)
        tokens = next_tokens.new_zeros(images, size)
        beams = next_indices.new_zeros(images, size)
        ends = set(eos_token_id.reshape(-1).tolist())
        for image in range(images):
            key = image * self.num_beam_groups + group_index
            if self._done[key]:
                tokens[image] = pad_token_id  # scores 0, every beam row 0, as transformers does
                continue
            kept = 0
            for rank, (token, score, beam) in enumerate(
                zip(next_tokens[image], next_scores[image], next_indices[image], strict=True)
            ):
                row = image * size + beam
                if int(token) in ends:
                    if rank < size:  # an end-of-text below the top group_size candidates is dropped
                        self._beam_hyps[key].add(input_ids[row].clone(), score.item(), length)
                else:
                    scores[image, kept], tokens[image, kept], beams[image, kept] = score, token, row
                    kept += 1
                    if kept == size:
                        break
            if kept < size:
                raise ValueError(f"more than {size} of the candidates {next_tokens[image]} are end-of-text")
            self._done[key] = self._done[key] or self._beam_hyps[key].done(next_scores[image].max().item(), length)
        return UserDict(
            next_beam_scores=scores.view(-1), next_beam_tokens=tokens.view(-1), next_beam_indices=beams.view(-1)
        )

    def finalize(
        self,
        input_ids,
        final_beam_scores,
        final_beam_tokens,
        final_beam_indices,
        max_length,
        pad_token_id,
        eos_token_id,
        beam_indices,
    ):
        for key, finished in enumerate(self._beam_hyps):
            if not self._done[key]:  # the open beams compete with the finished captions
                for row in range(key * self.group_size, (key + 1) * self.group_size):
                    finished.add(input_ids[row], final_beam_scores[row].item(), input_ids.shape[-1])
        best = []
        for image in range(len(self._beam_hyps) // self.num_beam_groups):
            groups = self._beam_hyps[image * self.num_beam_groups : (image + 1) * self.num_beam_groups]
            candidates = sorted((c for g in groups for c in g.captions), key=lambda c: c[0])
            best.append(candidates[-1])  # ties: the last one in
        lengths = [len(ids) for _, ids in best]
        width = max(lengths) + 1 if max_length is None else min(max(lengths) + 1, max_length)
        sequences = input_ids.new_full((len(best), width), pad_token_id)
        for image, ((_, ids), length) in enumerate(zip(best, lengths, strict=True)):
            sequences[image, :length] = ids
            if length < width:
                sequences[image, length] = eos_token_id.reshape(-1)[0]
        scores = torch.tensor([score for score, _ in best], dtype=torch.float32, device=self.device)
        return UserDict(sequences=sequences, sequence_scores=scores, beam_indices=None)
