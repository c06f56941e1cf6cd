"""Exact and near-duplicate images, grouped so that no copy of an image ends up on both sides of a split.

Exact duplicates share their file bytes or their decoded pixels (a copy re-saved losslessly). Near duplicates are
re-encoded, resized or brightness-shifted copies: their perceptual hashes (64-bit DCT pHash) lie within a small
Hamming distance AND their 64x64 thumbnails correlate almost perfectly. The hash alone is not enough for MRI: all
axial head slices share one coarse layout, so a few distinct images in ten thousand already fall within the hash
distance of copies, and at 7000 images (25 million pairs) such false links would chain unrelated images into large
groups. The correlation check, run only on the hash candidates, removes them (docs/data.md has the measurement).
Groups are the connected components of both kinds of link, so a chain of near copies forms one group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# pHash: DCT of a 32x32 thumbnail, the 8x8 lowest frequencies compared with their median.
HASH_THUMBNAIL = 32
HASH_BLOCK = 8
# Side of the thumbnail whose correlation confirms near duplicates. 64 separates copies from distinct slices better
# than 32 (measured on 1000 generated images: distinct pairs at most 0.93 instead of 0.96, edited copies >= 0.978).
SIGNATURE_THUMBNAIL = 64
# Defaults for near duplicates (docs/data.md gives the measurement behind them): candidates within this Hamming
# distance of 64 bits, confirmed when the Pearson correlation of their 64x64 thumbnails reaches the second value.
DEFAULT_NEAR_DISTANCE = 10
DEFAULT_MIN_CORRELATION = 0.97
# Rows of the pairwise distance matrix computed at once: 1024 x 7023 uint64 is about 57 MB.
PAIR_CHUNK_ROWS = 1024
# Candidate pairs whose signatures are compared at once: 2048 x 2 x 4096 float32 is about 67 MB.
CONFIRM_CHUNK_PAIRS = 2048

_BYTE_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class ImageHashes:
    """The fingerprints of one image.

    Attributes:
        file_sha256: hash of the file bytes.
        pixel_sha256: hash of the decoded grey pixels.
        phash: 64-bit perceptual hash.
        signature: the zero-mean, unit-norm 64x64 thumbnail (4096 float16, half the memory of float32 at no
            cost to the decision) confirming near duplicates, or None (then the hash distance alone decides).
    """

    file_sha256: str
    pixel_sha256: str
    phash: int
    signature: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class DuplicateGroups:
    """Duplicate groups over a list of images.

    Attributes:
        labels: group index of each image, numbered in order of first appearance (0, 1, ...).
        kinds: per group, ``single``, ``exact`` (all copies identical in bytes or pixels) or ``near``.
        exact_links: pairs linked by identical bytes or pixels.
        near_links: pairs linked as near duplicates only (confirmed candidates that are not exact copies).
        near_candidates: pairs within the hash distance, before the thumbnail check.
    """

    labels: np.ndarray
    kinds: list[str]
    exact_links: int
    near_links: int
    near_candidates: int = 0

    @property
    def count(self) -> int:
        """Number of groups, singletons included."""
        return len(self.kinds)

    def sizes(self) -> np.ndarray:
        """Number of images in each group."""
        return np.bincount(self.labels, minlength=self.count)


def thumbnail(grey: np.ndarray, side: int = HASH_THUMBNAIL) -> np.ndarray:
    """Area-averaged square thumbnail of a grey image (ignores resolution, aspect ratio and JPEG noise)."""
    small = Image.fromarray(np.asarray(grey, dtype=np.float32), mode="F").resize(
        (side, side), resample=Image.Resampling.BOX
    )
    return np.asarray(small, dtype=np.float64)


def hash_of_thumbnail(small: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a thumbnail.

    A bit is set where one of the 8x8 lowest DCT frequencies exceeds their median (DC term left out of the median).
    Adding a constant changes only the DC term and scaling intensities scales all terms, so brightness shifts keep
    the hash.
    """
    low = dctn(small, type=2, norm="ortho")[:HASH_BLOCK, :HASH_BLOCK].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def signature_of_thumbnail(small: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm thumbnail: the dot product of two signatures is their Pearson correlation."""
    centred = small.ravel() - small.mean()
    norm = float(np.linalg.norm(centred))
    # A flat image has no structure to compare: an all-zero signature correlates with nothing.
    return (centred / norm if norm > 1e-9 else np.zeros_like(centred)).astype(np.float16)


def perceptual_hash(grey: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a grey image (see :func:`hash_of_thumbnail`).

    Args:
        grey: (H, W) image.

    Returns:
        The hash as a Python int in [0, 2**64).
    """
    return hash_of_thumbnail(thumbnail(grey))


def image_hashes(grey: np.ndarray, file_sha256: str, pixel_sha256: str) -> ImageHashes:
    """All fingerprints of a decoded image."""
    signature = signature_of_thumbnail(thumbnail(grey, SIGNATURE_THUMBNAIL))
    return ImageHashes(file_sha256, pixel_sha256, perceptual_hash(grey), signature)


def popcount64(values: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64 value."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(*values.shape, 8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1, dtype=np.uint8)


def near_pairs(hashes: np.ndarray, max_distance: int, chunk_rows: int = PAIR_CHUNK_ROWS) -> np.ndarray:
    """All pairs (i < j) whose 64-bit hashes differ in at most ``max_distance`` bits.

    Args:
        hashes: (N,) uint64 hashes.
        max_distance: largest Hamming distance that links two images; negative: no pairs.
        chunk_rows: rows of the N x N distance matrix computed at once (bounds memory).

    Returns:
        (P, 2) int64 array of index pairs, sorted.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    pairs = [np.empty((0, 2), dtype=np.int64)]
    if max_distance < 0:
        return pairs[0]
    for start in range(0, len(hashes), chunk_rows):
        rows = hashes[start : start + chunk_rows]
        # Only columns after each row's own index are needed: the matrix is symmetric.
        distances = popcount64(rows[:, None] ^ hashes[None, start:])
        row, column = np.nonzero(distances <= max_distance)
        keep = column > row
        pairs.append(np.stack([row[keep] + start, column[keep] + start], axis=1).astype(np.int64))
    return np.concatenate(pairs)


def hamming_distances(hashes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Hamming distance of the hashes of each pair."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    return popcount64(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]).astype(np.int64)


def exact_pairs(keys: Sequence[str]) -> np.ndarray:
    """Pairs linking every image to the first earlier image with the same key."""
    first: dict[str, int] = {}
    pairs = []
    for index, key in enumerate(keys):
        if key in first:
            pairs.append((first[key], index))
        else:
            first[key] = index
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def group_duplicates(
    hashes: Sequence[ImageHashes],
    max_distance: int = DEFAULT_NEAR_DISTANCE,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
) -> DuplicateGroups:
    """Group images linked by identical bytes, identical pixels or near-duplicate evidence.

    Args:
        hashes: fingerprints of each image, in a deterministic order (group numbers follow it).
        max_distance: Hamming distance for near-duplicate candidates; negative turns near duplicates off.
        min_correlation: thumbnail correlation a candidate pair needs to count as near duplicates (checked only
            where both images carry a signature).

    Returns:
        The groups (connected components of all links).
    """
    count = len(hashes)
    exact = np.concatenate(
        [exact_pairs([h.file_sha256 for h in hashes]), exact_pairs([h.pixel_sha256 for h in hashes])]
    )
    phashes = np.array([h.phash for h in hashes], dtype=np.uint64)
    candidates = near_pairs(phashes, max_distance)
    near = confirm_pairs(hashes, candidates, min_correlation)
    exact_labels = _components(count, exact)
    labels = _components(count, np.concatenate([exact, near]))
    kinds = _group_kinds(labels, exact_labels)
    # A near link counts only where it joins images that are not already exact copies of each other.
    near_only = int(np.count_nonzero(exact_labels[near[:, 0]] != exact_labels[near[:, 1]]))
    exact_links = len({tuple(pair) for pair in exact.tolist()})
    return DuplicateGroups(
        labels=labels,
        kinds=kinds,
        exact_links=exact_links,
        near_links=near_only,
        near_candidates=len(candidates),
    )


def confirm_pairs(hashes: Sequence[ImageHashes], pairs: np.ndarray, min_correlation: float) -> np.ndarray:
    """Keep the candidate pairs whose thumbnails correlate at least ``min_correlation``.

    Pairs where either image lacks a signature are kept (the hash distance alone decides for them).
    """
    if len(pairs) == 0:
        return pairs
    has_signature = np.array([h.signature is not None for h in hashes])
    checkable = np.flatnonzero(has_signature[pairs[:, 0]] & has_signature[pairs[:, 1]])
    keep = np.ones(len(pairs), dtype=bool)
    if checkable.size:
        size = next(h.signature for h in hashes if h.signature is not None).size
        blank = np.zeros(size, dtype=np.float16)
        signatures = np.stack([blank if h.signature is None else h.signature for h in hashes])
        for start in range(0, checkable.size, CONFIRM_CHUNK_PAIRS):
            rows = checkable[start : start + CONFIRM_CHUNK_PAIRS]
            first = signatures[pairs[rows, 0]].astype(np.float32)
            second = signatures[pairs[rows, 1]].astype(np.float32)
            keep[rows] = np.einsum("ij,ij->i", first, second) >= min_correlation
    return pairs[keep]


def _components(count: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components, numbered in order of each component's first member."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(count, count)).tocsr()
    _, raw = connected_components(graph, directed=False)
    renumber: dict[int, int] = {}
    return np.array([renumber.setdefault(int(label), len(renumber)) for label in raw], dtype=np.int64)


def _group_kinds(labels: np.ndarray, exact_labels: np.ndarray) -> list[str]:
    """A group is ``exact`` when all its members fall in a single exact-copy component, ``near`` otherwise."""
    sizes = np.bincount(labels)
    distinct = np.unique(np.stack([labels, exact_labels], axis=1), axis=0)
    exact_components = np.bincount(distinct[:, 0], minlength=len(sizes))
    return [
        "single" if size == 1 else ("exact" if exact_components[group] == 1 else "near")
        for group, size in enumerate(sizes)
    ]
