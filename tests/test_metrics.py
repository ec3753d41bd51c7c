"""The collapse signal: a policy whose captions shrink toward nothing (or whose entropy does) while
the reward stays where it was trips it; one that learns, or is too young to judge, does not."""
from __future__ import annotations

from racro_fast.metrics import collapse_signal


def run(lengths, rewards, entropy=None):
    entropy = entropy or [1.0] * len(lengths)
    return [{"caption_len_mean": n, "reward_mean": r, "entropy_mean": e} for n, r, e in zip(lengths, rewards, entropy)]


def test_captions_shrinking_at_chance_trip_it():
    why = collapse_signal(run([12.0] * 10 + [6.0] * 10 + [1.0] * 10, [0.22] * 30))
    assert why.startswith("the mean caption length fell from 12 to 1 while the reward stayed at 0.220"), why


def test_entropy_vanishing_at_chance_trips_it():
    why = collapse_signal(run([12.0] * 30, [0.25] * 30, [2.0] * 10 + [1.0] * 10 + [0.1] * 10))
    assert why.startswith("the entropy fell from 2 to 0.1"), why


def test_learning_or_too_early_does_not():
    assert collapse_signal(run([12.0] * 10 + [2.0] * 20, [0.25] * 10 + [0.9] * 20)) == "", "the reward rose: shorter is fine"
    assert collapse_signal(run([12.0] * 10 + [1.0] * 9, [0.2] * 19)) == "", "fewer than two windows of steps"
    assert collapse_signal(run([12.0] * 30, [0.2] * 30)) == ""
