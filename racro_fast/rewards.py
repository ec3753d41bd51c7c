"""Answer extraction, grading and the caption reward.

A caption's reward is the mean correctness of the reasoner answers written from it. Grading
is math-verify's symbolic equivalence (so 1/2, 0.5 and \\frac{1}{2} agree) plus
multiple-choice letters. Reward functions are plain `f(completion, answer) -> float` in
`REWARD_FUNCS`; `reward_pool.RewardScorer` runs one of them in worker processes so that a
pathological answer (sympy can take minutes on some expressions) costs at most `timeout` seconds
and a zero reward instead of a stalled training step.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable

# math-verify warns once per process that its own timeout is off: grading here runs with none on
# purpose, bounded by reward_pool.RewardScorer's killable workers, so its warning is only noise.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_START = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_CHOICE = re.compile(r"^\(?([A-Za-z])\)?[.:]?$")
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$", re.DOTALL)
# A plain word or phrase: letters and single spaces, with a lowercase letter ("red", "Dark blue").
_WORDS = re.compile(r"(?=.*[a-z])[A-Za-z]+(?: [A-Za-z]+)*")
_OPTION_LABEL = re.compile(r"^\(?([A-Za-z])\)?[.:)]\s*|^\(([A-Za-z])\)\s*")


# --------------------------------------------------------------------------- extraction


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == '{' and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{" and (i == start or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level \\boxed{...} (or \\fbox{...}) in `text`, else None.

    Nested braces are matched; `\\boxed 5` (no braces) yields the next token. An unclosed
    box at the end (a truncated completion) does not count.
    """
    found: str | None = None
    pos = 0
    while (m := _BOX_START.search(text, pos)) is not None:
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            group = _braced(text, i)
            if group is None:
                break
            found, pos = group
        elif i > m.end() and i < len(text):
            token = re.match(r"[^\s$]+", text[i:])
            found, pos = token.group(0), i + token.end()
        else:
            pos = m.end()
    return found


# --------------------------------------------------------------------------- grading


def _strip_answer(s: str) -> str:
    s = s.strip()
    boxed = extract_boxed(s) if any(c in s for c in _BOX_COMMANDS) else None
    if boxed is not None:
        s = boxed.strip()
    s = s.strip("$").strip()
    while (m := _TEXT_WRAP.match(s)) is not None:
        s = m.group(1).strip()
    return s


def _choice_letter(s: str) -> str | None:
    m = _CHOICE.match(s)
    return m.group(1).upper() if m else None


def _option_text(options: list[str], letter: str) -> str | None:
    idx = ord(letter) - ord("A")
    if not 0 <= idx < len(options):
        return None
    text = str(options[idx]).strip()
    # Options are often stored with their own label ("B. 12", "(B) 12"): compare the content.
    m = _OPTION_LABEL.match(text)
    if m and (m.group(1) or m.group(2)).upper() == letter:
        text = text[m.end() :]
    return _strip_answer(text)


@functools.lru_cache(maxsize=1 << 16)
def _math_equal(pred: str, gold: str) -> bool:
    # Memoised per process: one math-verify comparison costs milliseconds (sympy), and a step's
    # answers repeat (a group's reasoner answers are a few values, asked again step after step).
    if pred == gold:
        return True
    if not pred or not gold:
        return False
    if _WORDS.fullmatch(pred) and _WORDS.fullmatch(gold) and len(pred) + len(gold) > 2:
        # Words are text. math-verify reads "cat" as c*a*t (so "act" equals it) and spends
        # ~20 ms in sympy on each pair of distinct words. Names in capitals ("AB") stay math.
        return pred.lower() == gold.lower()
    # Timeouts off: math-verify's are signal.alarm based and only work on a main thread.
    # The caller bounds the time (RewardScorer runs grading in killable processes).
    from math_verify import parse, verify  # here, not at the top: the trainer only extracts answers
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def grade(pred: str, gold: str, options: list[str] | None = None) -> bool:
    """Whether the answer `pred` equals the reference `gold`.

    Either may be wrapped in \\boxed{} or $...$. Choice letters ("A", "(b)", "C.") compare
    case-insensitively; with `options`, a letter also matches its option's text and the
    reverse. Plain words and phrases ("red", "dark blue") compare as text, ignoring case.
    Everything else is math-verify equivalence. No time bound: see RewardScorer.
    """
    pred, gold = _strip_answer(pred), _strip_answer(gold)
    if not pred or not gold:
        return False
    pred_letter, gold_letter = _choice_letter(pred), _choice_letter(gold)
    if pred_letter is not None and gold_letter is not None:
        return pred_letter == gold_letter
    if options:
        if gold_letter is not None:
            gold_text = _option_text(options, gold_letter)
            return gold_text is not None and (pred.lower() == gold_text.lower() or _math_equal(pred, gold_text))
        if pred_letter is not None:
            pred_text = _option_text(options, pred_letter)
            return pred_text is not None and (pred_text.lower() == gold.lower() or _math_equal(pred_text, gold))
    return _math_equal(pred, gold)


# --------------------------------------------------------------------------- reward functions


def boxed_math(completion: str, answer: str) -> float:
    """1.0 if the completion's last boxed answer grades equal to `answer`, else 0.0."""
    pred = extract_boxed(completion)
    return float(pred is not None and grade(pred, answer))


def boxed_choice(completion: str, answer: str) -> float:
    """1.0 if the completion's last boxed answer is the choice letter `answer`, else 0.0."""
    gold = _choice_letter(_strip_answer(answer))
    if gold is None:
        raise ValueError(f"answer: boxed_choice needs a choice letter, got {answer!r}")
    pred = extract_boxed(completion)
    return float(pred is not None and _choice_letter(_strip_answer(pred)) == gold)


_LETTER_LIST = re.compile(r"\(?[A-Z]\)?(?:\s*(?:,|and)\s*\(?[A-Z]\)?)+")


def eval_reward(pred: str, spec: str) -> float:
    """Evaluation: 1.0 if the extracted answer `pred` matches the item described by `spec`, else 0.0.

    `spec` is JSON {"golds", "options", "alternatives"} (`eval_data.BenchItem.grading_spec`; a
    string, so that RewardScorer can run this in a worker process with a time limit). A letter or
    the option's text both count for multiple choice; a gold like "A, C" (several letters) needs
    the same set.
    """
    pred = pred.strip()
    if not pred:
        return 0.0
    s = json.loads(spec)
    golds = [g for g in s["golds"] + s.get("alternatives", []) if g]
    for g in golds:
        if _LETTER_LIST.fullmatch(g.strip()):
            if _LETTER_LIST.fullmatch(pred.strip("$ ")) and set(re.findall(r"[A-Z]", g)) == set(
                    re.findall(r"[A-Z]", pred)):
                return 1.0
            continue
        if grade(pred, g, s.get("options")):
            return 1.0
    return 0.0


REWARD_FUNCS: dict[str, Callable[[str, str], float]] = {
    "boxed_math": boxed_math,  # training (the paper's reward)
    "boxed_choice": boxed_choice,
    "eval_reward": eval_reward,  # `racro-fast eval`: an extracted answer against a grading spec
}


def caption_rewards(correct: list[float], k: int) -> list[float]:
    """Reward per caption: mean correctness over its k reasoner answers (consecutive blocks)."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if len(correct) % k:
        raise ValueError(f"correct: length {len(correct)} is not a multiple of k={k}")
    return [sum(correct[i : i + k]) / k for i in range(0, len(correct), k)]


def floor_short_captions(rewards: list[float], lengths: list[int], min_tokens: int) -> list[float]:
    """train.min_caption_tokens: a caption shorter than min_tokens scores 0 whatever its answers
    (a floor against a policy collapsing to empty captions; 0 = off)."""
    return [0.0 if n < min_tokens else r for r, n in zip(rewards, lengths)]
