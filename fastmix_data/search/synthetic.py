"""Synthetic sources for tests, benchmarks and examples: K first-order Markov chains over bytes.

:class:`SyntheticStream` follows the stream's batch contract (``tokens`` ``[B, L+1]``, ``source``
``[B]``, ``batch_index``, ``weight_version``), is deterministic in ``(seed, batch index)``, resumable
(``state_dict``/``load_state_dict``) and accepts live weights (``set_weights``), so it can stand in
for :class:`fastmix_data.stream.MixtureStream` both as the search stream (``run_method(...,
stream=...)``) and as a weight sink. :func:`mixture_target` draws a target from known proportions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class MarkovSource:
    """A first-order Markov chain over byte ids ``offset .. offset + A - 1``.

    Every state has ``fanout`` likely successors (random per source) with decreasing probabilities,
    plus a little probability mass on every symbol of the alphabet.
    """

    def __init__(self, alphabet: Sequence[int], seed: int, fanout: int = 3, smoothing: float = 0.02):
        self.alphabet = np.asarray(alphabet, dtype=np.int64)
        A = len(self.alphabet)
        rng = np.random.default_rng(seed)
        P = np.full((A, A), smoothing / A)
        probs = np.array([0.6, 0.25, 0.15, 0.1, 0.05][:fanout])
        probs = probs / probs.sum() * (1 - smoothing)
        for a in range(A):
            nxt = rng.choice(A, size=fanout, replace=False)
            P[a, nxt] += probs
        self.P = P / P.sum(1, keepdims=True)
        self.cum = np.cumsum(self.P, axis=1)
        self.cum[:, -1] = 1.0

    def sample(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` sequences of ``length`` byte ids (int64)."""
        A = len(self.alphabet)
        out = np.empty((n, length), dtype=np.int64)
        state = rng.integers(0, A, size=n)
        out[:, 0] = state
        u = rng.random((n, length))
        for t in range(1, length):
            state = (self.cum[state] < u[:, t : t + 1]).sum(1)
            np.minimum(state, A - 1, out=state)
            out[:, t] = state
        return self.alphabet[out]


def markov_sources(
    num_sources: int, *, alphabet_size: int = 16, shift: int | None = None, seed: int = 0, base: int = 65
) -> list[MarkovSource]:
    """``num_sources`` Markov chains; source k uses bytes ``base + k*shift .. + alphabet_size``
    (wrapping inside 0..255), so neighbouring sources overlap when ``shift < alphabet_size``."""
    if shift is None:
        shift = alphabet_size // 2
    out = []
    for k in range(num_sources):
        alpha = [(base + k * shift + i) % 256 for i in range(alphabet_size)]
        out.append(MarkovSource(alpha, seed=seed * 1_000_003 + k))
    return out


class SyntheticStream:
    """An infinite stream of packed batches from synthetic sources.

    With ``weights=None`` sources are served stratified (round-robin over the global sequence
    index: every source gets ``B/K`` sequences per batch up to rounding) -- the search mode; with
    weights, each sequence's source is drawn from them.
    """

    def __init__(
        self,
        sources: Sequence[MarkovSource],
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        max_batches: int | None = None,
    ):
        self.sources = list(sources)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.source_names = list(names) if names is not None else [f"s{k}" for k in range(len(self.sources))]
        self.max_batches = max_batches
        self._weights = None if weights is None else _norm(weights)
        self.history: list[tuple[int, list[float] | None]] = [(0, self._weights)]
        self.next_batch = 0

    # -- weight sink -------------------------------------------------------------------------
    def set_weights(self, weights) -> int:
        """Use new weights from the next batch on; returns that batch index."""
        if isinstance(weights, dict):
            weights = [weights[n] for n in self.source_names]
        self._weights = _norm(weights)
        self.history.append((self.next_batch, self._weights))
        return self.next_batch

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch, "weights": self._weights}

    def load_state_dict(self, d: dict) -> None:
        self.next_batch = int(d["next_batch"])
        self._weights = d["weights"]

    # -- batches -----------------------------------------------------------------------------
    def batch(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        B, K = self.batch_size, len(self.sources)
        if self._weights is None:
            src = (np.arange(i * B, (i + 1) * B) % K).astype(np.int64)
        else:
            src = rng.choice(K, size=B, p=np.asarray(self._weights))
        toks = np.empty((B, self.seq_len + 1), dtype=np.int64)
        for k in np.unique(src):
            rows = np.nonzero(src == k)[0]
            toks[rows] = self.sources[k].sample(len(rows), self.seq_len + 1, rng)
        return {
            "tokens": torch.from_numpy(toks),
            "source": torch.from_numpy(src),
            "batch_index": i,
            "weight_version": len(self.history) - 1,
        }

    def __iter__(self) -> Iterator[dict]:
        while self.max_batches is None or self.next_batch < self.max_batches:
            b = self.batch(self.next_batch)
            self.next_batch += 1
            yield b


def mixture_batches(
    sources: Sequence[MarkovSource],
    proportions: Sequence[float],
    *,
    num_batches: int,
    batch_size: int,
    seq_len: int,
    seed: int = 12345,
) -> list[dict]:
    """Target batches drawn from a mixture of sources with the given proportions (sequence-level:
    each target sequence comes from one source, in proportion)."""
    p = np.asarray(_norm(proportions))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_batches):
        # exact proportions per batch (largest remainder), shuffled
        counts = np.floor(p * batch_size).astype(int)
        rest = batch_size - counts.sum()
        counts[np.argsort(-(p * batch_size - counts))[:rest]] += 1
        src = rng.permutation(np.repeat(np.arange(len(p)), counts))
        toks = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for k in np.unique(src):
            rows = np.nonzero(src == k)[0]
            toks[rows] = sources[k].sample(len(rows), seq_len + 1, rng)
        out.append({"tokens": torch.from_numpy(toks), "source": torch.from_numpy(src.astype(np.int64))})
    return out


def mixture_target(
    sources: Sequence[MarkovSource],
    proportions: Sequence[float],
    *,
    num_seqs: int,
    seq_len: int,
    seed: int = 12345,
    names: Sequence[str] | None = None,
):
    """A :class:`~fastmix_data.search.targets.TargetSet` of ``num_seqs`` sequences drawn from a
    mixture of sources in exact proportions (largest remainder), grouped by source, token-averaged."""
    from .targets import TargetSet

    batches = mixture_batches(sources, proportions, num_batches=1, batch_size=num_seqs, seq_len=seq_len, seed=seed)
    b = batches[0]
    group_names = list(names) if names is not None else [f"s{k}" for k in range(len(sources))]
    present = sorted(set(b["source"].tolist()))
    remap = {k: i for i, k in enumerate(present)}
    group = torch.tensor([remap[k] for k in b["source"].tolist()], dtype=torch.int64)
    return TargetSet(b["tokens"], group, [group_names[k] for k in present], "tokens", "synthetic-target")


def _norm(w) -> list[float]:
    a = np.asarray(list(w), dtype=np.float64)
    if a.ndim != 1 or not np.isfinite(a).all() or (a < 0).any() or a.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(w)}")
    return (a / a.sum()).tolist()


__all__ = ["MarkovSource", "SyntheticStream", "markov_sources", "mixture_batches", "mixture_target"]
