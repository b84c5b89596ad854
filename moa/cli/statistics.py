"""The statistics of `moa compare`: accuracy intervals over seeds and questions, and the
paired comparison of two variants.

A variant's accuracy is the mean over its seeds. Its 95% interval is a two-level percentile
bootstrap: each resample draws the seeds with replacement and the test questions with
replacement (one draw of questions for every seed: they share the test set), and takes the
mean accuracy; the interval holds the middle 95% of RESAMPLES such means. It covers both
the training noise (seeds) and the test-set noise (questions). The paired comparison with
the reference variant takes, on the seeds both finished, the per-question differences of
correctness (+1, 0, -1) and bootstraps their mean the same way, seeds drawn jointly (seed K
of both variants saw the same data order): questions both variants get right or both get
wrong add nothing to its spread, so it resolves smaller differences than two separate
intervals would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# 10,000 resamples put the Monte-Carlo error of a 95% percentile bound near 0.1 standard
# errors; the fixed seed makes the intervals the same on every run of the summary.
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CI_METHOD = (f"two-level percentile bootstrap, {RESAMPLES} resamples (numpy seed "
             f"{BOOTSTRAP_SEED}): the seeds drawn with replacement and the test questions drawn "
             "with replacement, one draw of questions for every seed")
PAIRED_METHOD = ("paired percentile bootstrap of the per-question difference in correctness "
                 "against the reference, on the seeds both finished (seeds drawn jointly, "
                 f"questions drawn once for both), {RESAMPLES} resamples (numpy seed "
                 f"{BOOTSTRAP_SEED})")


def correctness_matrix(vectors: Sequence[str]) -> np.ndarray:
    """[S, Q] float64 of 0/1 from S correctness strings ("1" right, "0" wrong) of equal
    length Q."""
    if not vectors or len({len(v) for v in vectors}) != 1:
        raise ValueError("correctness vectors must be one or more, all of one length")
    return np.array([[c == "1" for c in vector] for vector in vectors], dtype=np.float64)


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Two-level bootstrap of the mean of values [S, Q] (seeds x questions): per resample,
    Q questions drawn with replacement (the same for every seed) and S seeds drawn with
    replacement; the mean over the drawn seeds of each one's mean over the drawn questions.
    Returns [resamples] float64."""
    seeds, questions = values.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, min(resamples, 4_000_000 // max(1, questions)))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        picks = rng.integers(0, questions, size=(count, questions))
        picks += np.arange(count)[:, None] * questions
        weights = np.bincount(picks.ravel(), minlength=count * questions).reshape(
            count, questions).astype(np.float64)  # how often each question was drawn
        per_seed = weights @ values.T / questions  # [count, S]
        drawn = rng.integers(0, seeds, size=(count, seeds))
        means[start:start + count] = np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1)
    return means


def accuracy_interval(correct: np.ndarray, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean accuracy, low, high): the mean of correct [S, Q] (0/1) and its 95% two-level
    bootstrap interval (bootstrap_means)."""
    means = bootstrap_means(correct, resamples, seed)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(correct.mean()), float(low), float(high)


def paired_difference(correct: np.ndarray, reference: np.ndarray,
                      resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(difference, low, high): the mean accuracy of correct [S, Q] minus that of reference
    [S, Q] (row k of each: the same seed; columns: the same questions) and its paired 95%
    bootstrap interval (bootstrap_means of the per-question differences)."""
    if correct.shape != reference.shape:
        raise ValueError(f"paired correctness must have one shape, got {correct.shape} and "
                         f"{reference.shape}")
    return accuracy_interval(correct - reference, resamples, seed)


__all__ = ["BOOTSTRAP_SEED", "CI_METHOD", "PAIRED_METHOD", "RESAMPLES", "accuracy_interval",
           "bootstrap_means", "correctness_matrix", "paired_difference"]
