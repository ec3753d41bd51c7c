"""Answer extraction, grading, reward functions and the time-bounded scorer."""
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from racro_fast.reward_pool import RewardScorer
from racro_fast.rewards import (
    REWARD_FUNCS,
    _math_equal,
    boxed_choice,
    boxed_math,
    caption_rewards,
    extract_boxed,
    grade,
)


# Module-level so the scorer's spawned workers can import them by name.
def raise_on_bad(completion: str, answer: str) -> float:
    if completion == "bad":
        raise ZeroDivisionError("grader blew up")
    return 1.0


def exit_on_crash(completion: str, answer: str) -> float:
    if completion == "crash":
        os._exit(3)  # like a segfault in a C extension: no exception, the process is gone
    return 1.0


def hang_on_slow(completion: str, answer: str) -> float:
    if completion == "slow":
        time.sleep(3600)
    return 1.0


def torch_loaded(completion: str, answer: str) -> float:
    return float("torch" in sys.modules)


def _trainer_script(tmp_path: Path, body: str) -> list[str]:
    """A `python trainer.py` command whose __main__ imports torch, as the trainer's does."""
    script = tmp_path / "trainer.py"
    script.write_text("import torch\nfrom racro_fast.reward_pool import RewardScorer\n"
                      "from test_rewards import hang_on_slow, torch_loaded\n\n"
                      "if __name__ == '__main__':\n" + textwrap.indent(textwrap.dedent(body), "    "))
    return [sys.executable, str(script)]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{3}", "3"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box wins
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are content
        ("\\boxed{x^{2}+\\sqrt{y_{1}}}", "x^{2}+\\sqrt{y_{1}}"),  # nested groups
        ("\\fbox{7}", "7"),
        ("\\boxed {4}", "4"),
        ("\\boxed 5$ done", "5"),
        ("\\boxed{}", ""),
        ("\\boxed{2} and a truncated \\boxed{3", "2"),
        ("no box here: 42", None),
        ("\\boxedsomething{3}", None),
        ("\\boxed{\\boxed{9}}", "\\boxed{9}"),  # the outer box is the last top-level one
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected, f"extract_boxed({text!r})"


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\frac12", "\\boxed{0.5}"),
        ("3.0", "3"),
        ("3", "\\boxed{3}"),
        ("$2\\pi$", "2\\pi"),
        ("x = 3", "3"),
        ("A", "a"),
        ("(B)", "B"),
        ("C.", "(c)"),
        ("\\text{D}", "D"),
        ("Red", "red"),
        ("\\text{dark blue}", "Dark Blue"),
        ("AB", "BA"),
    ],
)
def test_grade_equal(pred, gold):
    assert grade(pred, gold), f"{pred!r} should grade equal to {gold!r}"


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.51", "1/2"),
        ("4", "3"),
        ("A", "B"),
        ("", "3"),
        ("3", ""),
        ("\\frac{1}{3}", "0.5"),
        ("act", "cat"),
        ("blue square", "square blue"),
        ("two", "2"),
    ],
)
def test_grade_not_equal(pred, gold):
    assert not grade(pred, gold), f"{pred!r} should not grade equal to {gold!r}"


def test_grade_matches_letters_to_option_text():
    options = ["A. 10", "B. 12", "C. 3/4"]
    assert grade("12", "B", options), "option text of the gold letter"
    assert grade("0.75", "C", options), "option text compares by math equivalence"
    assert not grade("10", "B", options)
    plain = ["10", "12"]
    assert grade("B", "12", plain), "predicted letter mapped to its option text"
    assert not grade("A", "12", plain)
    assert not grade("E", "12", plain), "a letter beyond the options matches nothing"


def test_reward_functions():
    assert set(REWARD_FUNCS) == {"boxed_math", "boxed_choice", "eval_reward"}
    assert boxed_math("... so the answer is \\boxed{\\frac{1}{2}}.", "0.5") == 1.0
    assert boxed_math("the answer is 0.5", "0.5") == 0.0, "no box, no reward"
    assert boxed_math("\\boxed{0.4}", "\\boxed{0.5}") == 0.0
    assert boxed_choice("hence \\boxed{(b)}", "B") == 1.0
    assert boxed_choice("hence \\boxed{C}", "B") == 0.0
    with pytest.raises(ValueError, match="answer"):
        boxed_choice("\\boxed{3}", "3")


def test_caption_rewards_mean_over_k():
    assert caption_rewards([1, 0, 1, 1, 0, 0], k=2) == [0.5, 1.0, 0.0]
    assert caption_rewards([1.0, 0.0, 1.0], k=3) == pytest.approx([2 / 3])
    assert caption_rewards([1.0, 0.0], k=1) == [1.0, 0.0]
    with pytest.raises(ValueError, match="k"):
        caption_rewards([1.0, 0.0, 1.0], k=2)
    with pytest.raises(ValueError, match="k"):
        caption_rewards([1.0], k=0)


def test_scorer_scores_in_workers():
    with RewardScorer("boxed_math", timeout=10.0, workers=2) as scorer:
        completions = ["\\boxed{0.5}", "\\boxed{2}", "no box", "\\boxed{\\frac{3}{4}}", "\\boxed{B}"]
        answers = ["1/2", "3", "1", "0.75", "b"]
        assert scorer.score(completions, answers) == [1.0, 0.0, 0.0, 1.0, 1.0]
        many = scorer.score([f"\\boxed{{{i}}}" for i in range(50)], [str(i) for i in range(50)])
        assert many == [1.0] * 50, f"wrong items: {[i for i, v in enumerate(many) if v != 1.0]}"
        assert scorer.score([], []) == []
        assert scorer.n_timeout == scorer.n_error == 0


def test_scorer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fn_name"):
        RewardScorer("no_such_reward")
    with pytest.raises(ValueError, match="timeout"):
        RewardScorer(timeout=0)
    with pytest.raises(ValueError, match="workers"):
        RewardScorer(workers=-1)
    with RewardScorer(workers=1) as scorer, pytest.raises(ValueError, match="answers"):
        scorer.score(["a", "b"], ["a"])


def test_scorer_counts_an_exception_and_goes_on(caplog):
    with RewardScorer(raise_on_bad, timeout=10.0, workers=2) as scorer:
        with caplog.at_level(logging.WARNING, logger="racro_fast.rewards"):
            scores = scorer.score(["ok", "bad", "ok", "ok"], ["x"] * 4)
        assert scores == [1.0, 0.0, 1.0, 1.0]
        assert (scorer.n_error, scorer.n_timeout) == (1, 0)
        assert any("ZeroDivisionError" in r.getMessage() for r in caplog.records), caplog.text
        assert scorer.score(["ok"] * 3, ["x"] * 3) == [1.0] * 3, "the scorer must still work"


def test_scorer_abandons_a_hung_item(caplog):
    with RewardScorer(hang_on_slow, timeout=1.0, workers=2) as scorer:
        scorer.score(["ok"], ["x"])  # workers up, so the timing below is the hang alone
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="racro_fast.rewards"):
            scores = scorer.score(["ok", "slow", "ok", "ok", "ok", "ok"], ["x"] * 6)
        elapsed = time.monotonic() - start
        assert scores == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0], "items after the hung one must still be scored"
        assert (scorer.n_timeout, scorer.n_error) == (1, 0)
        assert elapsed < 30, f"a hung item must cost about the timeout, took {elapsed:.1f}s"
        assert any("timeout" in r.getMessage() for r in caplog.records), caplog.text
        assert scorer.score(["ok", "ok"], ["x", "x"]) == [1.0, 1.0], "the replaced worker must work"


def test_scorer_survives_a_worker_that_dies():
    with RewardScorer(exit_on_crash, timeout=10.0, workers=1) as scorer:
        assert scorer.score(["ok", "crash", "ok"], ["x"] * 3) == [1.0, 0.0, 1.0]
        assert (scorer.n_error, scorer.n_timeout) == (1, 0)
        assert scorer.score(["ok"], ["x"]) == [1.0]


def test_scorer_in_process_bounds_each_item(caplog):
    # workers=0: graded in this process, no child started; a hung item ends at its timer and scores
    # 0, an item that raises scores 0, the rest are graded, and the SIGALRM handler is put back
    import psutil
    children = len(psutil.Process().children())
    previous = signal.getsignal(signal.SIGALRM)
    with RewardScorer(hang_on_slow, timeout=1.0, workers=0) as scorer:
        assert len(psutil.Process().children()) == children, "workers=0 started a process"
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="racro_fast.rewards"):
            scores = scorer.score(["ok", "slow", "ok"], ["x"] * 3)
        elapsed = time.monotonic() - start
        assert scores == [1.0, 0.0, 1.0]
        assert (scorer.n_timeout, scorer.n_error) == (1, 0)
        assert elapsed < 10, f"a hung item must cost about the timeout, took {elapsed:.1f}s"
        assert any("timeout" in r.getMessage() for r in caplog.records), caplog.text
        assert signal.getsignal(signal.SIGALRM) is previous
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0), "the timer was left running"
    with RewardScorer(raise_on_bad, timeout=5.0, workers=0) as scorer:
        assert scorer.score(["ok", "bad", "ok"], ["x"] * 3) == [1.0, 0.0, 1.0]
        assert (scorer.n_error, scorer.n_timeout) == (1, 0)
    with RewardScorer("boxed_math", timeout=5.0, workers=0) as scorer:
        completions = ["\\boxed{0.5}", "\\boxed{2}", "no box", "\\boxed{\\frac{3}{4}}", "\\boxed{B}"]
        assert scorer.score(completions, ["1/2", "3", "1", "0.75", "b"]) == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_scorer_in_process_needs_the_main_thread():
    import threading
    errors = []

    def make() -> None:
        try:
            RewardScorer("boxed_math", workers=0)
        except ValueError as e:
            errors.append(str(e))
    t = threading.Thread(target=make)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0], errors


def test_floor_short_captions():
    from racro_fast.rewards import floor_short_captions
    assert floor_short_captions([1.0, 0.5, 1.0, 0.0], [0, 3, 4, 9], 4) == [0.0, 0.0, 1.0, 0.0]
    assert floor_short_captions([1.0, 0.5], [0, 1], 0) == [1.0, 0.5], "0 is off"


def test_math_equal_is_memoised():
    """A repeated (answer, reference) pair is graded once per process, with the same verdict."""
    _math_equal.cache_clear()
    verdicts = [grade("0.5", "\\frac{1}{2}"), grade("0.5", "\\frac{1}{2}"), grade("0.4", "\\frac{1}{2}")]
    assert verdicts == [True, True, False]
    info = _math_equal.cache_info()
    assert (info.hits, info.misses) == (1, 2)


def test_scorer_workers_import_the_grader_not_the_trainer(tmp_path):
    """A worker must not re-import the trainer's __main__ (torch and transformers, ~450 MB each)."""
    cmd = _trainer_script(tmp_path, """
        with RewardScorer(torch_loaded, timeout=60.0, workers=1) as scorer:
            print("SCORES", scorer.score(["x"], ["y"]))
    """)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert out.returncode == 0, out.stderr
    assert "SCORES [0.0]" in out.stdout, f"the worker loaded torch: {out.stdout!r}"


def test_scorer_workers_die_with_a_killed_trainer(tmp_path):
    """SIGKILL of the trainer while a worker is busy on a hung item leaves no worker behind."""
    cmd = _trainer_script(tmp_path, """
        import sys
        scorer = RewardScorer(hang_on_slow, timeout=3600.0, workers=1)
        scorer.score(["ok"], ["x"])
        print("WORKER", scorer._workers[0].pid, flush=True)
        scorer.score(["slow"], ["x"])
    """)
    trainer = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        line = trainer.stdout.readline()
        assert line.startswith("WORKER"), f"trainer printed {line!r}"
        worker = int(line.split()[1])
        time.sleep(0.5)  # the worker is inside the hung item now
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 15
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        status = Path(f"/proc/{worker}/stat").read_text().split()[2] if Path(f"/proc/{worker}").exists() else "gone"
        assert status in ("gone", "Z"), f"worker {worker} outlived its trainer (state {status})"
    finally:
        trainer.kill()


def test_scorer_grades_a_repeated_pair_once(monkeypatch):
    """A named reward is pure: a pair seen before in the call or in an earlier call is not sent again;
    a callable of the caller's is run on every item."""
    sent: list[int] = []
    real = RewardScorer._score

    def counting(self, completions, answers):
        sent.append(len(completions))
        return real(self, completions, answers)

    monkeypatch.setattr(RewardScorer, "_score", counting)
    with RewardScorer("boxed_math", timeout=30.0, workers=2) as scorer:
        assert scorer.score(["\\boxed{1}", "\\boxed{2}", "\\boxed{1}", "\\boxed{1}"], ["1", "1", "1", "2"]) == [
            1.0, 0.0, 1.0, 0.0]
        assert scorer.score(["\\boxed{2}", "\\boxed{1}", "\\boxed{3}"], ["1", "1", "3"]) == [0.0, 1.0, 1.0]
    assert sent == [3, 1], "repeated pairs must be scored once"
    sent.clear()
    with RewardScorer(raise_on_bad, timeout=30.0, workers=1) as scorer:
        assert scorer.score(["ok", "bad", "bad", "ok"], ["x"] * 4) == [1.0, 0.0, 0.0, 1.0]
        assert scorer.n_error == 2
    assert sent == [4]


def test_scorer_does_not_keep_a_failed_item(monkeypatch):
    """An item that scored 0 by failure is graded again next time."""
    with RewardScorer("boxed_math", timeout=30.0, workers=1) as scorer:
        monkeypatch.setattr(scorer, "_failed", set())
        real = scorer._score

        def first_fails(completions, answers):
            out = real(completions, answers)
            scorer._failed = {0}
            return [0.0] + out[1:]

        monkeypatch.setattr(scorer, "_score", first_fails)
        assert scorer.score(["\\boxed{1}", "\\boxed{2}"], ["1", "2"]) == [0.0, 1.0]
        monkeypatch.setattr(scorer, "_score", real)
        assert scorer.score(["\\boxed{1}", "\\boxed{2}"], ["1", "2"]) == [1.0, 1.0]
