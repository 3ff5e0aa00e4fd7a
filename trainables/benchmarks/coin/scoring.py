"""Answer scoring for CoIN tasks, as the MoDE evaluation scores them: pure functions of strings.

* Every task: exact match after lower-casing, trimming and collapsing whitespace (a trailing
  full stop is ignored); with several reference answers (TextVQA/VizWiz lists) any one counts.
* ScienceQA (task names containing ``scienceqa`` or ``sqa``): the gold option letter is accepted in
  its usual surface forms — ``B``, ``b``, ``B.``, ``(B)``, ``B)``, ``B: text``, ``The answer is B.``,
  ``Answer: (B)`` — and so is the gold option's text (options are read from the question:
  ``A. text`` lines or inline ``(A) text``).
* ImageNet (names containing ``imagenet``): a hit if the gold class name appears anywhere in the
  response ("it is a golden retriever" counts for "golden retriever").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SPACES = re.compile(r"\s+")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s*(.+?)\s*$", re.MULTILINE)
_OPTION_INLINE = re.compile(r"\(([A-Z])\)\s*(.+?)(?=\s*\([A-Z]\)|\n|$)")
_LEADING_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.):,]|\s|$)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-Za-z])\)?(?:[.):,]|\s|$)", re.IGNORECASE)


def normalize(text: str) -> str:
    """Lower-case, trim, collapse whitespace, drop one trailing full stop."""
    text = _SPACES.sub(" ", text.strip().lower())
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    normalized = normalize(prediction)
    return any(normalized == normalize(answer) for answer in answers)


def parse_options(question: str) -> dict[str, str]:
    """Option letter → option text, from ``A. text`` lines or inline ``(A) text (B) text``."""
    options = {letter: text for letter, text in _OPTION_LINE.findall(question)}
    if len(options) < 2:
        options = {letter: text.strip() for letter, text in _OPTION_INLINE.findall(question)}
    return options


def _gold_letter(gold: str, options: dict[str, str]) -> str | None:
    match = re.fullmatch(r"\(?([A-Za-z])\)?\.?", gold.strip())
    if match:
        return match.group(1).upper()
    for letter, text in options.items():  # a gold given as option text
        if normalize(text) == normalize(gold):
            return letter
    return None


def predicted_letter(prediction: str) -> str | None:
    """The option letter a response names: a leading letter (``B``, ``(B)``, ``B. text``) or
    ``answer is B`` / ``answer: (B)`` anywhere. A leading lower-case word such as ``a cat`` does not
    count (only a lone lower-case letter or one followed by punctuation does)."""
    text = prediction.strip()
    match = _LEADING_LETTER.match(text)
    if match and (match.group(1).isupper() or len(text) == 1 or not text[1:2].isspace()):
        return match.group(1).upper()
    match = _ANSWER_IS.search(text)
    if match:
        return match.group(1).upper()
    return None


def scienceqa_correct(prediction: str, answers: Sequence[str], question: str) -> bool:
    """Lenient ScienceQA rule: the gold letter in any surface form, or the gold option's text."""
    options = parse_options(question)
    for gold in answers:
        letter = _gold_letter(gold, options)
        if letter is None:
            if exact_match(prediction, [gold]):
                return True
            continue
        if predicted_letter(prediction) == letter:
            return True
        if letter in options and normalize(prediction) == normalize(options[letter]):
            return True
    return False


def imagenet_correct(prediction: str, answers: Sequence[str]) -> bool:
    """Lenient ImageNet rule: the gold class name appears anywhere in the response."""
    normalized = normalize(prediction)
    return any(normalize(answer) and normalize(answer) in normalized for answer in answers)


def scoring_rule(task: str) -> str:
    name = task.lower()
    if "scienceqa" in name or "sqa" in name:
        return "scienceqa"
    if "imagenet" in name:
        return "imagenet"
    return "exact"


def is_correct(task: str, prediction: str, answers: Sequence[str], question: str = "") -> bool:
    """Score one response with the rule of ``task`` (see the module doc)."""
    rule = scoring_rule(task)
    if rule == "scienceqa":
        return scienceqa_correct(prediction, answers, question)
    if rule == "imagenet":
        return imagenet_correct(prediction, answers)
    return exact_match(prediction, answers)
