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


def test_entropy_exploding_at_chance_trips_it():
    """What `racro-fast demo loss.entropy_coef=0.05 rollout.temperature=1.0 train.steps=300` did: the
    entropy rose from about 0.85 to 5 and the captions became ' to to to to to', the reward fell."""
    why = collapse_signal(run([5.0] * 30, [0.12] * 10 + [0.4] * 10 + [0.07] * 10, [0.85] * 10 + [2.0] * 10 + [5.0] * 10))
    assert why.startswith("the entropy rose from 0.85 to 5 while the reward stayed at 0.070"), why


def test_learning_or_too_early_does_not():
    assert collapse_signal(run([12.0] * 10 + [2.0] * 20, [0.25] * 10 + [0.9] * 20)) == "", "the reward rose: shorter is fine"
    assert collapse_signal(run([12.0] * 10 + [1.0] * 9, [0.2] * 19)) == "", "fewer than two windows of steps"
    assert collapse_signal(run([12.0] * 30, [0.2] * 30)) == ""


# ---- the reduction table, as properties over any split into micro-batches and updates

from hypothesis import given, settings, strategies as st  # noqa: E402

from racro_fast.data import RowStream  # noqa: E402
from racro_fast.metrics import UPDATE_REDUCTIONS, MetricSums, combine_updates  # noqa: E402

finite = st.floats(-1e3, 1e3, allow_nan=False)
micro_batch = st.tuples(st.integers(1, 50), st.fixed_dictionaries({k: finite for k in UPDATE_REDUCTIONS}))


@settings(max_examples=60, deadline=None)
@given(st.lists(micro_batch, min_size=1, max_size=6))
def test_micro_batch_sums_follow_the_table(mbs):
    sums = MetricSums()
    for tokens, m in mbs:
        sums.add({**m, "num_tokens_local": float(tokens)}, float(tokens))
    out = sums.reduce()
    assert set(out) == set(UPDATE_REDUCTIONS), "a metric outside the table leaked in, or one went missing"
    total = sum(t for t, _ in mbs)
    for k, how in UPDATE_REDUCTIONS.items():
        vals = [m[k] for _, m in mbs]
        want = {"sum": sum(vals), "min": min(vals), "max": max(vals),
                "token_mean": sum(v * t for v, (t, _) in zip(vals, mbs)) / total}[how]
        assert abs(out[k] - want) <= 1e-9 * max(1.0, abs(want)) * len(vals), (k, how, out[k], want)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.fixed_dictionaries({"loss": finite, "ratio_min": finite, "ratio_max": finite,
                                                 "is_weight_max": finite, "grad_norm": finite}),
                          st.booleans()), min_size=1, max_size=5))
def test_updates_combine_by_the_table(updates):
    results = [{**m, "skipped": float(skip)} for m, skip in updates]
    out = combine_updates(results)
    assert out["ratio_min"] == min(r["ratio_min"] for r in results)
    assert out["ratio_max"] == max(r["ratio_max"] for r in results)
    assert out["is_weight_max"] == max(r["is_weight_max"] for r in results)
    assert abs(out["loss"] - sum(r["loss"] for r in results) / len(results)) < 1e-9 * 1e3
    taken = [r["grad_norm"] for r in results if not r["skipped"]]
    assert out["skipped"] == len(results) - len(taken)
    if taken:
        assert abs(out["grad_norm"] - sum(taken) / len(taken)) < 1e-9 * 1e3
    else:
        assert out["grad_norm"] != out["grad_norm"], "no update taken: grad_norm is NaN"


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(1, 30), seed=st.integers(0, 5), shuffle=st.booleans())
def test_row_stream_takes_every_row_once_per_epoch_across_world_changes(data, n, seed, shuffle):
    """Ranks take uneven numbers of rows (bad rows are skipped), the run resumes on another world
    size (twice), and the new ranks go on: every epoch still holds every row exactly once."""
    worlds = [data.draw(st.integers(1, min(5, n))) for _ in range(3)]
    seen: dict[int, list[int]] = {}

    def take(stream: RowStream, k: int) -> None:
        for _ in range(k):
            row = stream.next()
            seen.setdefault(stream.epoch, []).append(row)

    streams = [RowStream(n, seed, shuffle, r, worlds[0]) for r in range(worlds[0])]
    for world in worlds[1:]:
        for s in streams:
            take(s, data.draw(st.integers(0, 2 * n)))
        states = [s.state() for s in streams]
        streams = [RowStream.resharded(states, n, seed, shuffle, r, world) for r in range(world)]
    last = max(s.epoch for s in streams) + 2
    for s in streams:
        while s.epoch < last:
            take(s, 1)
    for epoch in range(last):
        assert sorted(seen.get(epoch, [])) == list(range(n)), (epoch, worlds, sorted(seen.get(epoch, [])))
