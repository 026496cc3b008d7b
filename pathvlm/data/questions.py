"""Closed-form question templates shared by the instruction builders and `pathvlm eval vqa`.

The builders train on these phrasings (among others), and the evaluation asks in them, so a
score measures what the model learned about the image, not whether it parses a new format.
"""

from __future__ import annotations

import string


def mc_question(options: list[str]) -> str:
    """One-line multiple choice: ``A) x. B) y. ...`` and an instruction to answer with the letter."""
    listed = " ".join(f"{string.ascii_uppercase[i]}) {opt}." for i, opt in enumerate(options))
    return (
        f"Which of the following best describes the tissue in this image? {listed} "
        "Answer with the letter only."
    )


def yesno_question(name: str) -> str:
    return f"Does this image show {name}? Answer yes or no."
