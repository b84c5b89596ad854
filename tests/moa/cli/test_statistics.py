"""moa/cli/statistics.py: `moa compare`'s intervals and paired comparison, on cases with
known answers."""

import numpy as np
import pytest

from moa.cli.statistics import accuracy_interval, correctness_matrix, paired_difference


def random_correctness(seeds: int, questions: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((seeds, questions)) < p).astype(np.float64)


def test_identical_variants_differ_by_exactly_zero_with_a_degenerate_interval():
    correct = random_correctness(3, 200, 0.6, seed=1)
    assert paired_difference(correct, correct.copy()) == (0.0, 0.0, 0.0)


def test_right_on_every_question_against_right_on_none_is_plus_one():
    right, wrong = np.ones((3, 50)), np.zeros((3, 50))
    assert paired_difference(right, wrong) == (1.0, 1.0, 1.0)
    assert paired_difference(wrong, right) == (-1.0, -1.0, -1.0)
    assert accuracy_interval(right) == (1.0, 1.0, 1.0)


def test_one_seed_interval_is_the_binomial_interval():
    # one seed: only the questions vary, so for many questions the percentile interval is
    # p +- 1.96 sqrt(p (1 - p) / Q); its half-width here is 0.015, the bounds within 0.002
    correct = random_correctness(1, 4000, 0.6, seed=2)
    mean, low, high = accuracy_interval(correct)
    half = 1.96 * np.sqrt(mean * (1 - mean) / correct.shape[1])
    assert mean == correct.mean()
    assert abs(low - (mean - half)) < 0.002 and abs(high - (mean + half)) < 0.002
    # three seeds right on the same questions: the seeds share the test set, so one draw of
    # questions serves them all and the interval is the one seed's (independent draws per
    # seed would shrink it by sqrt(3))
    _, low3, high3 = accuracy_interval(np.repeat(correct, 3, axis=0))
    assert abs(low3 - (mean - half)) < 0.002 and abs(high3 - (mean + half)) < 0.002


def test_the_seed_level_widens_the_interval_to_the_spread_of_the_seeds():
    # seeds at accuracy 0.5, 0.6, 0.7 on 5,000 questions: the question noise is small
    # (0.007), and a draw of three seeds averages 0.5 with probability 1/27 > 2.5%, 0.7
    # likewise, so the interval spans about [0.5, 0.7]; a one-level bootstrap over the
    # questions alone would give 0.6 +- 0.014
    questions = 5_000
    rng = np.random.default_rng(3)
    correct = np.zeros((3, questions))
    for row, accuracy in enumerate((0.5, 0.6, 0.7)):
        correct[row, rng.permutation(questions)[:int(accuracy * questions)]] = 1
    mean, low, high = accuracy_interval(correct)
    assert mean == pytest.approx(0.6, abs=1e-12)
    assert 0.48 < low < 0.51 and 0.69 < high < 0.72


def test_pairing_resolves_a_difference_that_two_separate_intervals_cannot():
    # the variant is right on 10 more of 1,000 questions and the same elsewhere: +0.010.
    # Paired, only those 10 questions vary (about Poisson(10) of them drawn: 0.004 to
    # 0.017); the two separate intervals (+-0.03 each) overlap widely.
    reference = random_correctness(1, 1000, 0.5, seed=4)
    variant = reference.copy()
    variant[0, np.flatnonzero(reference[0] == 0)[:10]] = 1
    difference, low, high = paired_difference(variant, reference)
    assert difference == pytest.approx(0.010, abs=1e-12)
    assert 0.0 < low < 0.006 and 0.014 < high < 0.02
    assert accuracy_interval(variant)[1] < accuracy_interval(reference)[2]


def test_the_intervals_are_the_same_on_every_call():
    correct = random_correctness(3, 300, 0.5, seed=5)
    assert accuracy_interval(correct) == accuracy_interval(correct.copy())


def test_correctness_strings_become_a_seeds_by_questions_matrix():
    assert correctness_matrix(["101", "011"]).tolist() == [[1, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="one length"):
        correctness_matrix(["10", "101"])
