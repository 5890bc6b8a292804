"""A procedural image-caption set for the demo: coloured shapes and captions that describe them.

Every image holds one or two shapes; a caption names each shape's size, colour and kind, and
with two shapes how the first sits relative to the second ("a small red circle left of a large
blue square"). A caption and its mirror ("a large blue square right of a small red circle") describe
the same scene and share one id. Everything is drawn from a seed, so a run is reproducible, and held-out
pairs come from a separate random stream with distinct scenes, so retrieval on them has one right answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SIZES = ("small", "large")
COLORS = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.22),
    "blue": (0.15, 0.35, 0.98),
    "yellow": (0.96, 0.88, 0.10),
    "purple": (0.65, 0.20, 0.85),
}
SHAPES = ("circle", "square", "triangle", "cross")
RELATIONS = ("left of", "right of", "above", "below")
MIRRORED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPECIAL_TOKENS = ("[pad]", "[bos]", "[eos]", "[mask]")

_RADIUS = {"small": (0.09, 0.12), "large": (0.16, 0.20)}  # half-extent as a fraction of the image side
_OBJECT_KINDS = len(SIZES) * len(COLORS) * len(SHAPES)


@dataclass(frozen=True)
class Shape:
    """One shape: its words, and its centre in ``[0, 1]`` image coordinates (x right, y down)."""

    size: str
    color: str
    kind: str
    x: float
    y: float

    @property
    def code(self) -> int:
        """An index in ``[0, sizes × colours × kinds)`` naming the words, not the position."""
        colors = tuple(COLORS)
        return (SIZES.index(self.size) * len(colors) + colors.index(self.color)) * len(SHAPES) + SHAPES.index(self.kind)

    def words(self) -> str:
        return f"{self.size} {self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """One or two shapes; with two, ``relation`` says where the first sits relative to the second."""

    shapes: tuple[Shape, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        if len(self.shapes) == 1:
            return f"a {self.shapes[0].words()}"
        first, second = self.shapes
        return f"a {first.words()} {self.relation} a {second.words()}"

    def mirrored(self) -> Scene:
        """The same picture told from the other shape: "a X left of a Y" is "a Y right of a X"."""
        if len(self.shapes) == 1:
            return self
        return Scene(self.shapes[::-1], MIRRORED[self.relation])

    @property
    def canonical(self) -> Scene:
        """The one of the scene and its mirror that reads left to right or top to bottom."""
        return self if len(self.shapes) == 1 or self.relation in ("left of", "above") else self.mirrored()

    @property
    def equivalent_captions(self) -> tuple[str, ...]:
        """Every caption that describes this scene exactly: the caption, and with two shapes its mirror."""
        return tuple(dict.fromkeys((self.caption, self.mirrored().caption)))

    @property
    def caption_id(self) -> int:
        """Equal for scenes that equivalent captions describe, distinct otherwise.

        ITC treats equal ids as positives and never draws a hard negative among them, so a caption and
        its mirror ("a X left of a Y", "a Y right of a X") share one id: they describe the same picture,
        and an ITM "no match" label on either would be wrong.
        """
        if len(self.shapes) == 1:
            return self.shapes[0].code
        scene = self.canonical
        first, second = scene.shapes
        pair = first.code * _OBJECT_KINDS + second.code
        return _OBJECT_KINDS + pair * len(RELATIONS) + RELATIONS.index(scene.relation)


def _random_shape(rng: np.random.Generator, x_range: tuple[float, float], y_range: tuple[float, float]) -> Shape:
    return Shape(
        size=SIZES[rng.integers(len(SIZES))],
        color=tuple(COLORS)[rng.integers(len(COLORS))],
        kind=SHAPES[rng.integers(len(SHAPES))],
        x=float(rng.uniform(*x_range)),
        y=float(rng.uniform(*y_range)),
    )


def sample_scene(rng: np.random.Generator, two_shape_fraction: float = 0.75, jitter: float | None = None) -> Scene:
    """A random scene; two shapes sit in opposite halves so the relation in the caption holds.

    ``jitter=None`` places shapes anywhere in their region. A float places each centre on a point of a
    3 x 3 grid (the patch corners of a 4 x 4 patch grid), moved by up to ``jitter`` (a fraction of the
    side) each way: a tiny patch-based encoder then sees each kind of shape cut the same way by the patch
    borders, and learns the kinds from far fewer images.
    """
    if jitter is not None:
        return _grid_scene(rng, two_shape_fraction, jitter)
    if rng.random() >= two_shape_fraction:
        return Scene((_random_shape(rng, (0.3, 0.7), (0.3, 0.7)),))
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    near, far, anywhere = (0.2, 0.3), (0.7, 0.8), (0.25, 0.75)
    if relation in ("left of", "right of"):
        first_x, second_x = (near, far) if relation == "left of" else (far, near)
        first, second = _random_shape(rng, first_x, anywhere), _random_shape(rng, second_x, anywhere)
    else:
        first_y, second_y = (near, far) if relation == "above" else (far, near)
        first, second = _random_shape(rng, anywhere, first_y), _random_shape(rng, anywhere, second_y)
    while second.code == first.code:  # "a red circle left of a red circle" names neither one
        second = _random_shape(rng, (second.x, second.x), (second.y, second.y))
    return Scene((first, second), relation)


_GRID = (0.25, 0.5, 0.75)


def _grid_scene(rng: np.random.Generator, two_shape_fraction: float, jitter: float) -> Scene:
    def around(centre: float) -> tuple[float, float]:
        return (centre - jitter, centre + jitter)

    if rng.random() >= two_shape_fraction:
        return Scene((_random_shape(rng, around(0.5), around(0.5)),))
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    near, far, across = _GRID[0], _GRID[2], _GRID[rng.integers(len(_GRID))]
    first_at, second_at = (near, far) if relation in ("left of", "above") else (far, near)
    if relation in ("left of", "right of"):
        first = _random_shape(rng, around(first_at), around(across))
        second = _random_shape(rng, around(second_at), around(across))
    else:
        first = _random_shape(rng, around(across), around(first_at))
        second = _random_shape(rng, around(across), around(second_at))
    while second.code == first.code:
        second = _random_shape(rng, (second.x, second.x), (second.y, second.y))
    return Scene((first, second), relation)


def _shape_mask(shape: Shape, grid_x: np.ndarray, grid_y: np.ndarray, radius: float) -> np.ndarray:
    dx, dy = grid_x - shape.x, grid_y - shape.y
    if shape.kind == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape.kind == "square":
        return (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    if shape.kind == "triangle":  # apex up: the half-width grows from 0 at the top to radius at the bottom
        return (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    if shape.kind == "cross":
        arm = radius * 0.35
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {SHAPES}")


def render(scenes: list[Scene], image_size: int, rng: np.random.Generator) -> Tensor:
    """Float32 images ``(N, 3, S, S)``, roughly zero-mean: a dark noisy background and the shapes on it."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    centres = (np.arange(image_size) + 0.5) / image_size
    grid_y, grid_x = np.meshgrid(centres, centres, indexing="ij")  # [S, S]
    images = rng.normal(0.15, 0.04, size=(len(scenes), 3, image_size, image_size)).astype(np.float32)
    for index, scene in enumerate(scenes):
        for shape in scene.shapes:
            radius = float(rng.uniform(*_RADIUS[shape.size]))
            mask = _shape_mask(shape, grid_x, grid_y, radius)
            images[index][:, mask] = np.asarray(COLORS[shape.color], dtype=np.float32)[:, None]
    return torch.from_numpy((images - 0.4) / 0.3)


class CaptionTokenizer:
    """Word-level tokenizer over the fixed caption vocabulary; ids 0..3 are pad, bos, eos, mask."""

    def __init__(self) -> None:
        words = ["a", *SIZES, *COLORS, *SHAPES]
        for relation in RELATIONS:
            words.extend(w for w in relation.split() if w not in words)
        self.vocab = [*SPECIAL_TOKENS, *words]
        self._ids = {word: index for index, word in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = range(4)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.bos_id, self.eos_id, self.mask_id)

    def encode(self, captions: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        """``[bos] words [eos]`` right-padded: ids ``(N, max_len)`` int64 and the padding mask (True = pad)."""
        ids = torch.full((len(captions), max_len), self.pad_id, dtype=torch.int64)
        for row, caption in enumerate(captions):
            unknown = [w for w in caption.split() if w not in self._ids]
            if unknown:
                raise ValueError(f"caption {caption!r} has words outside the vocabulary: {unknown}")
            tokens = [self.bos_id, *(self._ids[w] for w in caption.split()), self.eos_id]
            if len(tokens) > max_len:
                raise ValueError(f"caption {caption!r} needs {len(tokens)} tokens, more than max_len={max_len}")
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids == self.pad_id

    def decode(self, ids: Tensor) -> list[str]:
        """Words up to the first eos of each row, special tokens dropped."""
        captions = []
        for row in ids.tolist():
            words = []
            for token in row:
                if token == self.eos_id:
                    break
                if token not in self.special_ids:
                    words.append(self.vocab[token])
            captions.append(" ".join(words))
        return captions


MAX_CAPTION_TOKENS = 12  # [bos] a small red circle left of a large blue square [eos]


@dataclass
class CaptionBatch:
    images: Tensor  # [N, 3, S, S] float32
    text_ids: Tensor  # [N, L] int64, [bos] ... [eos] then pad
    padding_mask: Tensor  # [N, L] bool, True = pad
    caption_ids: Tensor  # [N] int64, equal for captions that describe the same scene
    captions: list[str]
    equivalent_captions: list[tuple[str, ...]]  # per pair, every caption that describes its image exactly
    canonical_text_ids: Tensor  # [N, L] int64, the caption told left to right / top to bottom (decoder targets)


class ShapesCaptions:
    """Endless training batches and a held-out set, all determined by ``seed``."""

    def __init__(
        self, seed: int = 0, image_size: int = 32, max_len: int = MAX_CAPTION_TOKENS, jitter: float | None = None
    ) -> None:
        self.image_size = image_size
        self.jitter = jitter
        self.max_len = max_len
        self.tokenizer = CaptionTokenizer()
        self._train_rng = np.random.default_rng([seed, 0])
        self._held_out_seed = [seed, 1]

    def _batch(self, scenes: list[Scene], rng: np.random.Generator) -> CaptionBatch:
        captions = [scene.caption for scene in scenes]
        text_ids, padding_mask = self.tokenizer.encode(captions, self.max_len)
        return CaptionBatch(
            images=render(scenes, self.image_size, rng),
            text_ids=text_ids,
            padding_mask=padding_mask,
            caption_ids=torch.tensor([scene.caption_id for scene in scenes], dtype=torch.int64),
            captions=captions,
            equivalent_captions=[scene.equivalent_captions for scene in scenes],
            canonical_text_ids=self.tokenizer.encode([scene.canonical.caption for scene in scenes], self.max_len)[0],
        )

    def train_batch(self, batch_size: int) -> CaptionBatch:
        """The next training batch (captions may repeat; ``caption_ids`` says which)."""
        scenes = [sample_scene(self._train_rng, jitter=self.jitter) for _ in range(batch_size)]
        return self._batch(scenes, self._train_rng)

    def held_out(self, size: int) -> CaptionBatch:
        """``size`` pairs from their own random stream, no two alike (one right answer per query): two captions
        never describe the same scene, a caption and its mirror included."""
        rng = np.random.default_rng(self._held_out_seed)
        scenes, seen = [], set()
        while len(scenes) < size:
            scene = sample_scene(rng, jitter=self.jitter)
            if scene.caption_id not in seen:
                seen.add(scene.caption_id)
                scenes.append(scene)
        return self._batch(scenes, rng)
