"""Closed-form questions: the templates and answer formats shared by the instruction builders,
training-time monitoring and `pathvlm eval vqa`, and the parsers that read the answers.

The builders train on these phrasings (among others), and the evaluation asks in them, so a
score measures what the model learned about the image, not whether it parses a new format.

Answers name what the image shows first and decide second (``mantle cell lymphoma (B).``,
``The image shows follicular lymphoma, so the answer is no.``): a decoder has to commit to its
first token, and a small one that must give the letter or yes/no first learns the prior of the
letter or of "yes" instead of reading the image. Naming first turns the decision into copying.
"""

from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase


def mc_question(options: list[str]) -> str:
    """One-line multiple choice: ``A) x. B) y. ...`` and an instruction to name the option."""
    listed = " ".join(f"{LETTERS[i]}) {opt}." for i, opt in enumerate(options))
    return (
        f"Which of the following best describes the tissue in this image? {listed} "
        "Answer with the option and its letter."
    )


def yesno_question(name: str) -> str:
    return f"Does this image show {name}? Say what it shows, then answer yes or no."


_MARK = re.compile(r"(?:^|(?<=[\s(]))([A-H])[.)]\s+")
_ENDING = re.compile(r"\s+(?:answer|say|reply|respond|choose|pick)\b.*$", re.IGNORECASE | re.DOTALL)
_YESNO = (
    re.compile(r"\b(?:does|do) (?:this|the|these) (?:image|slide|tissue|field|section|tile|patch)e?s? "
               r"(?:show|contain|represent)s?\s+(?:a |an |the )?(.+?)\s*\?", re.IGNORECASE),
    re.compile(r"^\s*(?:is|are) (?:this|these|it|the tissue|the image)\s+(?:a |an |the )?(.+?)\s*\?", re.IGNORECASE),
)


def closed_options(question: str) -> list[str] | None:
    """The options of a multiple-choice question, ``A) x. B) y.`` on one line (`mc_question`) or
    ``A. x`` / ``A) x`` one per line, in order; None unless it lists A, B, ... (two at least)."""
    marks = list(_MARK.finditer(question))
    run: list[re.Match[str]] = []
    for m in marks:  # the first run of letters A, B, C, ...
        if m.group(1) == LETTERS[len(run)]:
            run.append(m)
    if len(run) < 2:
        return None
    options = []
    for i, m in enumerate(run):
        end = run[i + 1].start() if i + 1 < len(run) else len(question)
        text = question[m.end(): end]
        if i + 1 == len(run):
            text = _ENDING.sub("", text.split("\n")[0])
        options.append(text.strip().rstrip(".;,").strip())
    return options if all(options) else None


def yesno_subject(question: str) -> str | None:
    """What a yes/no question asks about (``Does this image show X? ...`` -> X), or None."""
    for rx in _YESNO:
        m = rx.search(question)
        if m:
            return m.group(1).strip(" .")
    return None


def mc_answer(name: str, index: int) -> str:
    """The trained answer to a multiple-choice question: the option's name, then its letter."""
    return f"{name} ({LETTERS[index]})."


def yesno_answer(shown: str, asked: str) -> str:
    """The trained answer to "does this image show `asked`?" about an image of `shown`."""
    return f"The image shows {shown}, so the answer is {'yes' if shown == asked else 'no'}."


def parse_choice(answer: str, options: list[str]) -> int | None:
    """Index of the chosen option: a leading letter (``B``, ``(B)``, ``B)``), else the one option
    named, else a trailing ``(B)``; None when the answer does not settle on one option."""
    text = answer.strip()
    m = re.match(r"^\W*(?:answer\W*)?\(?([A-Za-z])\)?(?:$|[\s.):,])", text, flags=re.IGNORECASE)
    # a lone lowercase "a" starting a sentence is an article, not option A
    if (
        m
        and m.group(1).upper() in LETTERS[: len(options)]
        and (len(text) <= 3 or m.group(1).isupper())
    ):
        return LETTERS.index(m.group(1).upper())
    low = text.lower()
    hits = [i for i, opt in enumerate(options) if opt.lower() in low]
    # an option whose name holds another's ("lymphoma" in "follicular lymphoma") is the one meant
    hits = [i for i in hits if not any(j != i and options[i].lower() in options[j].lower() for j in hits)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        m = re.search(r"\(([A-Z])\)\W*$", text)
        if m and m.group(1) in LETTERS[: len(options)]:
            return LETTERS.index(m.group(1))
    return None


def letter_agrees(answer: str, options: list[str]) -> bool | None:
    """Whether the letter an answer writes after a name (``mucus (B).``) is that option's letter;
    None when the answer does not both name one option and write a letter."""
    named = parse_choice(answer, options)
    m = re.search(r"\(([A-Z])\)\W*$", answer.strip())
    if named is None or m is None or not any(opt.lower() in answer.lower() for opt in options):
        return None
    return LETTERS.index(m.group(1)) == named


def parse_yesno(answer: str) -> bool | None:
    """True/False from a leading yes/no, or from a closing ``the answer is yes/no``."""
    low = answer.strip().lower()
    m = re.match(r"^\W*(yes|no)\b", low) or re.search(r"\banswer(?: is|:)\s*(yes|no)\b", low)
    return None if m is None else m.group(1) == "yes"
