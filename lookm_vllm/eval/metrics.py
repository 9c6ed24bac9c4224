"""MileBench's scores, ported so that a number here is the number MileBench's ``evaluate.py`` gives.

MileBench (github.com/MileBench/MileBench, ``evaluate.py``) picks the metric per task::

    "NeedleInAHaystack" in task name  -> needle: normalized answer is one whitespace word of the
                                         normalized prediction (exact match of the needle)
    "MMCoQA" in task name             -> contains: normalized answer is a substring
    question_type == "open-ended"     -> ROUGE-L F1 (the ``rouge`` 1.0.1 package)
    question_type == "multi-choice"   -> accuracy, the option letter extracted from the prediction

Every answer goes through MileBench's ``process`` first (:func:`normalize_answer`). The ports keep
MileBench's quirks on purpose (each one is marked below), because a harness that "fixes" them
reports numbers that cannot be compared with the paper's. Quirks worth knowing:

* an empty prediction counts as option ``C`` in multiple choice;
* at most 32 periods are stripped (``re.UNICODE`` passed as ``sub``'s count);
* ROUGE-L is the ``rouge`` package's summary-level variant with ``exclusive=True``: texts are split
  into sentences at ``.``, and the reference/prediction lengths and the LCS are counted in
  *distinct* words. "the cat sat on the mat" vs "the cat is on the mat" scores 0.8 (4 distinct LCS
  words of 5 distinct words each), where textbook ROUGE-L gives 5/6.

Also here: :func:`token_agreement`, the agreement of a greedy output with the full-cache one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Metric = Literal["accuracy", "rouge_l", "needle", "contains"]
METRIC_LABELS: dict[str, str] = {
    "accuracy": "Accuracy",
    "rouge_l": "ROUGE-L",
    "needle": "Accuracy (needle exact match)",
    "contains": "Accuracy (answer contained)",
}

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# MileBench's pattern; "(?!<=\d)" is a lookahead (not a lookbehind), so this is "\.(?!\d)".
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# MileBench calls periodStrip.sub("", text, re.UNICODE): the flag lands in the count argument.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_REGEX_SPECIALS = ("\\", ".", "^", "$", "*", "+", "?", "{", "}", "[", "]", "|", "(", ")")


def metric_for(task_name: str, question_type: str) -> Metric:
    """The metric MileBench's ``evaluate.py`` uses for a task (by name, then question type).

    Raises
    ------
    ValueError
        For a question type MileBench cannot score (not a needle/MMCoQA task either).
    """
    if "NeedleInAHaystack" in task_name:
        return "needle"
    if "MMCoQA" in task_name:
        return "contains"
    if question_type == "open-ended":
        return "rouge_l"
    if question_type == "multi-choice":
        return "accuracy"
    raise ValueError(
        f"question_type {question_type!r} cannot be scored: MileBench scores 'multi-choice' "
        "(accuracy) and 'open-ended' (ROUGE-L), and needle/MMCoQA tasks by name"
    )


def normalize_answer(text: str) -> str:
    """MileBench's ``Eval.process``: whitespace, punctuation and periods stripped, lower case."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    # Quirk: the test looks at the input string, not at what the loop has produced so far.
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATION:
        if strip_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)
    return out.strip("'").strip('"').strip().lower()


def _escaped(option: str) -> str:
    # MileBench escapes this list itself (backslash first), not with re.escape.
    out = normalize_answer(option)
    for ch in _REGEX_SPECIALS:
        out = out.replace(ch, "\\" + ch)
    return out


def option_letter(index: int) -> str:
    """MileBench's option label: ``chr(65 + index)`` (A, B, ...; past Z it keeps counting)."""
    return chr(65 + index)


def extract_choice(text: str, options: dict[str, str]) -> str:
    """MileBench's ``match_choice``: the option letter(s) a (normalized) prediction names.

    In order: the first "<letter> <option text>" found anywhere; else the first option text found
    (spaces ignored); else the text itself when it is a single option letter; else every character
    of the text that is an option letter, concatenated (usually not a valid single answer).
    An empty text answers ``"C"`` (MileBench's quirk).
    """
    if text == "":
        return "C"
    try:
        both = "|".join(_escaped(f"{k} {v}") for k, v in options.items())
        found = re.search(f"({both})", text, re.DOTALL)
        if found:
            return found.group(0)[0].upper()
        bare = "|".join(_escaped(v).replace(" ", "") for v in options.values())
        found = re.search(f"({bare})", text.replace(" ", ""), re.DOTALL)
        if found:
            for k, v in options.items():
                if found[0].strip() == _escaped(v).replace(" ", ""):
                    return k.upper()
        if len(text) == 1 and text.upper() in options:
            return text.upper()
    except re.error:
        return text
    return "".join(c.upper() for c in text if c.upper() in options)


def multi_choice_score(prediction: str, response: str, choice_list: Sequence[str]) -> float:
    """1.0 when the option extracted from ``prediction`` is the one equal to ``response``.

    Raises
    ------
    ValueError
        When the normalized response is not one of the normalized choices (MileBench asserts it).
    """
    choices = [normalize_answer(c) for c in choice_list]
    answer = normalize_answer(response)
    if answer not in choices:
        raise ValueError(f"response {response!r} is not one of the choices {list(choice_list)!r}")
    options = {option_letter(i): c for i, c in enumerate(choices)}
    return float(extract_choice(normalize_answer(prediction), options)
                 == option_letter(choices.index(answer)))


def _sentences(text: str) -> list[str]:
    # rouge 1.0.1's Rouge.get_scores: split at ".", keep non-empty pieces, squeeze whitespace.
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def _words(sentences: Sequence[str]) -> list[str]:
    return [w for s in sentences for w in s.split(" ")]


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """The distinct words of the LCS of ``x`` and ``y``, backtracked as rouge's ``_recon_lcs``."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = (table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1]
                           else max(table[i - 1][j], table[i][j - 1]))
    out: set[str] = set()
    i, j = len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 as ``rouge.Rouge().get_scores(prediction, reference)[0]["rouge-l"]["f"]``.

    Summary level with distinct-word counting (see the module docstring); inputs are used as
    given (normalize them first, as MileBench does). 0.0 when either text has no sentence.
    """
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    union: set[str] = set()
    for ref_sentence in ref:
        ref_words = _words([ref_sentence])
        for hyp_sentence in hyp:
            union |= _lcs_words(ref_words, _words([hyp_sentence]))
    recall = len(union) / len(set(_words(ref)))
    precision = len(union) / len(set(_words(hyp)))
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def score(metric: Metric, prediction: str, response: str,
          choice_list: Sequence[str] | None = None) -> float:
    """One item's score in [0, 1] under MileBench's ``metric`` (see :func:`metric_for`)."""
    if metric == "accuracy":
        if choice_list is None:
            raise ValueError("multiple-choice scoring needs the choice list")
        return multi_choice_score(prediction, response, choice_list)
    answer, pred = normalize_answer(response), normalize_answer(prediction)
    if metric == "rouge_l":
        return rouge_l(pred, answer) if pred else 0.0
    if metric == "needle":
        return float(answer in pred.split())
    if metric == "contains":
        return float(answer in pred)
    raise ValueError(f"unknown metric {metric!r}")


def token_agreement(tokens: Sequence[int], reference: Sequence[int]) -> tuple[float, int | None]:
    """Agreement of a greedy output with the full-cache output of the same item.

    Returns
    -------
    match_rate : float
        Positions where both outputs hold the same token, over the longer output's length (a
        shorter output counts its missing positions as mismatches); 1.0 for two empty outputs.
    first_divergence : int or None
        The first decode step (0-based) where they differ, ``None`` when they are identical.
    """
    longest = max(len(tokens), len(reference))
    if longest == 0:
        return 1.0, None
    pairs = list(zip(tokens, reference, strict=False))
    matches = sum(a == b for a, b in pairs)
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    if first is None and len(tokens) != len(reference):
        first = len(pairs)
    return matches / longest, first
