"""Seeded synthetic mask embeddings that look like DINOv2's, at any size, generated in chunks.

Real DINOv2 embeddings of a labelled dataset cannot be downloaded here, and i.i.d. Gaussian
vectors are the wrong test for an index (they have no structure to exploit and no classes to
confuse). :class:`EmbeddingGenerator` mimics what matters to a vocabulary index:

- about 2,000 classes whose populations follow Zipf's law (a few classes hold most masks, as
  "wall" and "sky" do in ADE20K), each made of a few sub-centres (a class seen from several
  views or in several contexts);
- a shared mean direction, so every pair of embeddings is positively correlated (DINOv2's
  features are: between-class cosines around 0.1-0.4), and within-class cosines around 0.5-0.8;
- an anisotropic, decaying spectrum: the centres and the within-class variation live mostly in a
  few hundred directions whose variances fall off as a power law, plus a small isotropic floor.

Entry ``i`` depends only on ``(seed, i // chunk)``, so a database of 10^7 x 1536 is generated
(and its exact neighbours computed, as ``benchmarks/vocabulary_scale.py`` does) chunk by chunk,
never whole in memory.
:meth:`EmbeddingGenerator.statistics` measures the cosines and the spectrum that the results
quote.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = ["EmbeddingGenerator"]


@dataclass
class EmbeddingGenerator:
    """Synthetic DINOv2-like embeddings: unit vectors of ``dim`` with class labels.

    Parameters
    ----------
    seed : int
        Everything (centres, bases, every chunk) follows from it.
    classes, subcentres : int
        Number of classes and of sub-centres per class.
    zipf : float
        Class ``c`` (0-based) is drawn with probability proportional to ``(c + 1) ** -zipf``.
    rank : int
        Dimensions of the subspace that carries the structured variation.
    decay : float
        The ``j``-th direction of that subspace has standard deviation ``(j + 1) ** -decay``.
    mean_weight, class_weight, sub_weight, within_weight, floor_weight : float
        Norms of the shared mean, the class centre, the sub-centre offset, the per-entry
        structured variation and the isotropic floor before the sum is normalised; they set
        the within- and between-class cosines (see :meth:`statistics`).
    chunk : int
        Entries per generated chunk (the unit of determinism and memory).
    """

    seed: int = 0
    dim: int = 1536
    classes: int = 2000
    subcentres: int = 4
    zipf: float = 1.0
    rank: int = 256
    decay: float = 0.5
    mean_weight: float = 0.6
    class_weight: float = 0.8
    sub_weight: float = 0.45
    within_weight: float = 0.55
    floor_weight: float = 0.25
    chunk: int = 1 << 16
    _basis: np.ndarray = field(init=False, repr=False)
    _spectrum: np.ndarray = field(init=False, repr=False)
    _centres: np.ndarray = field(init=False, repr=False)
    _popularity: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0])
        # An orthonormal basis of the structured subspace and the spectrum along it.
        basis, _ = np.linalg.qr(rng.standard_normal((self.dim, self.rank)))
        spectrum = (np.arange(self.rank) + 1.0) ** -self.decay
        spectrum /= np.sqrt((spectrum**2).sum())  # a draw from it has unit expected norm
        mean = _unit(rng.standard_normal(self.dim))
        class_dirs = _unit((rng.standard_normal((self.classes, self.rank)) * spectrum) @ basis.T)
        sub_dirs = _unit((rng.standard_normal((self.classes, self.subcentres, self.rank)) * spectrum) @ basis.T)
        centres = self.mean_weight * mean + self.class_weight * class_dirs[:, None, :] + self.sub_weight * sub_dirs
        popularity = (np.arange(self.classes) + 1.0) ** -self.zipf
        self._basis = basis.astype(np.float32)
        self._spectrum = spectrum.astype(np.float32)
        self._centres = centres.astype(np.float32)
        self._popularity = popularity / popularity.sum()

    @property
    def class_probabilities(self) -> np.ndarray:
        """The probability of each class (Zipf), float64 [classes]."""
        return self._popularity.copy()

    def chunk_at(self, index: int, stream: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``index`` of ``stream``: ``(vectors float32 [chunk, dim], labels int64 [chunk])``.
        Stream 1 is the database; others give independent samples of the same distribution
        (training samples, queries)."""
        return self._draw(np.random.default_rng([self.seed, stream, index]), self.chunk)

    def database(self, n: int, stream: int = 1) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """The first ``n`` entries of ``stream`` as ``(first position, vectors, labels)`` chunks."""
        for start in range(0, n, self.chunk):
            x, y = self.chunk_at(start // self.chunk, stream)
            stop = min(self.chunk, n - start)
            yield start, x[:stop], y[:stop]

    def sample(self, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` entries of ``stream`` (queries, training samples) in one array."""
        parts = list(self.database(n, stream))
        return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(self.classes, size=n, p=self._popularity)
        subs = rng.integers(0, self.subcentres, n)
        coefficients = rng.standard_normal((n, self.rank), dtype=np.float32)
        coefficients *= self._spectrum * np.float32(self.within_weight)
        x = coefficients @ self._basis.T
        x += self._centres[labels, subs]
        # The isotropic floor: uniform noise of the same variance as Gaussian noise (a sum over
        # 1536 dimensions does not tell them apart) at a quarter of the cost to draw.
        floor = rng.random((n, self.dim), dtype=np.float32)
        floor -= np.float32(0.5)
        floor *= np.float32(self.floor_weight * np.sqrt(12.0 / self.dim))
        x += floor
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        return x, labels.astype(np.int64)

    def statistics(self, n: int = 20_000, stream: int = 99) -> dict[str, float]:
        """Measured on ``n`` samples: mean/percentile cosines within and between classes, the
        share of the variance in the top 10 / 100 principal directions, and the population of
        the largest and smallest classes."""
        x, y = self.sample(n, stream)
        rng = np.random.default_rng([self.seed, stream, 1 << 30])
        a, b = rng.integers(0, n, (2, 200_000))
        cos = np.einsum("ij,ij->i", x[a], x[b])
        same = (y[a] == y[b]) & (a != b)
        other = y[a] != y[b]
        # pairs within a class are rare under random sampling: draw them directly as well
        order = np.argsort(y, kind="stable")
        starts = np.searchsorted(y[order], y[order])
        ends = np.searchsorted(y[order], y[order], side="right")
        big = np.flatnonzero(ends - starts > 1)
        pick = rng.choice(big, 50_000)
        partner = starts[pick] + rng.integers(0, (ends - starts)[pick])
        keep = partner != pick
        within = np.einsum("ij,ij->i", x[order[pick[keep]]], x[order[partner[keep]]])
        centred = x - x.mean(axis=0)
        eig = np.linalg.eigvalsh(centred.T @ centred / n)[::-1]
        pops = self.class_probabilities
        return {
            "within_cos_mean": float(within.mean()),
            "within_cos_p10": float(np.percentile(within, 10)),
            "within_cos_p90": float(np.percentile(within, 90)),
            "between_cos_mean": float(cos[other].mean()),
            "between_cos_p10": float(np.percentile(cos[other], 10)),
            "between_cos_p90": float(np.percentile(cos[other], 90)),
            "random_pair_same_class": float(same.mean()),
            "variance_top10": float(eig[:10].sum() / eig.sum()),
            "variance_top100": float(eig[:100].sum() / eig.sum()),
            "largest_class_share": float(pops[0]),
            "smallest_class_share": float(pops[-1]),
        }


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
