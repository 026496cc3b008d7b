"""`pathvlm eval vqa`: closed-form questions built from the labels, asked to a chat model.

Each image gets one multiple-choice question shown in several option orders (cyclic shifts of
the class list) and two yes/no questions (its own class: yes; another class: no). Accuracy is
over all questions; option-order consistency is the share of images whose chosen class (not
letter) is the same in every order. Answers are read by `pathvlm.data.questions`' parsers: the
option an answer names counts; `mc_letter_matches_name` says how often the letter written after
that name is the named option's (a model can name the right class and write the wrong letter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pathvlm.data.questions import (
    letter_agrees,
    mc_question,
    parse_choice,
    parse_yesno,
    yesno_question,
)
from pathvlm.errors import ConfigError
from pathvlm.eval.common import ImageSequence, Perturbation, scale_summary
from pathvlm.eval.datasets import load_dataset, match_classes
from pathvlm.eval.report import write_report
from pathvlm.resources import resolve_resource
from pathvlm.zeroshot import make_prompt_set, tile_scale

log = logging.getLogger(__name__)


class ChatModel(Protocol):
    def ask(self, image: Any, question: str, mpp: float | None = None, **gen: Any) -> str: ...


@dataclass
class VQAConfig:
    """Options of a closed-form VQA evaluation."""

    prompts: str | None = None  # prompt file or packaged name: the first synonym of a class is its display name
    split: str | None = None
    n_orders: int = 3  # option orders per multiple-choice question
    max_new_tokens: int = 40  # answers name the class before the letter or yes/no
    seed: int = 0
    limit: int | None = None  # first N images only (quick runs)
    resize_mpp_factor: float = 1.0
    stain_jitter: float = 0.0
    mpp: float | None = None  # um/px of images without their own (CSV 'mpp' column wins)
    decoding: dict[str, Any] = field(default_factory=dict)  # extra generation kwargs
    # False: every question goes to the LLM (``ask(..., route=False)``), measuring the language
    # model alone; True: as the chat answers (closed questions about scored classes decided by
    # the scores, the rest by the LLM)
    route: bool = True


def run_vqa_eval(
    model: ChatModel,
    data_source: str | Path,
    cfg: VQAConfig,
    model_info: dict[str, str],
    json_path: str | Path | None = None,
) -> dict[str, Any]:
    """Ask every question with greedy decoding; score accuracy and option-order consistency."""
    if not hasattr(model, "ask"):
        raise ConfigError(
            f"model {model_info.get('model')} cannot answer questions (no ask); "
            "eval vqa needs a chat model, not a bare encoder"
        )
    data = load_dataset(data_source, cfg.split)
    if cfg.limit:
        data = data.subset(list(range(min(cfg.limit, len(data)))))
    if cfg.prompts:
        prompt_set = make_prompt_set(resolve_resource("prompts", cfg.prompts))
        label_map = match_classes(data.labels, prompt_set)
        names = {lab: prompt_set.classes[key][0] for lab, key in label_map.items()}
    else:
        names = {lab: lab for lab in data.classes}
    labels = sorted(names)
    if len(labels) < 2:
        raise ConfigError(f"{data_source}: VQA needs at least two classes, found {labels}")
    gen = {"do_sample": False, "max_new_tokens": cfg.max_new_tokens, **cfg.decoding}
    if not cfg.route:
        gen["route"] = False
    rng = np.random.default_rng(cfg.seed)
    images = ImageSequence(
        data.paths, Perturbation(cfg.resize_mpp_factor, cfg.stain_jitter, cfg.seed)
    )
    mpps = data.image_mpps(cfg.mpp)
    records, mc_correct, yn_correct, consistent, letters = [], [], [], [], []
    n_orders = max(1, min(cfg.n_orders, len(labels)))
    for i, label in enumerate(data.labels):
        image = images[i]
        chosen = []
        for shift in range(n_orders):
            order = labels[shift:] + labels[:shift]
            options = [names[lab] for lab in order]
            answer = model.ask(image, mc_question(options), mpp=mpps[i], **gen)
            pick = parse_choice(answer, options)
            chosen.append(None if pick is None else order[pick])
            mc_correct.append(chosen[-1] == label)
            agrees = letter_agrees(answer, options)
            if agrees is not None:
                letters.append(agrees)
            records.append(
                {
                    "path": str(data.paths[i]),
                    "label": label,
                    "type": "mc",
                    "options": options,
                    "answer": answer,
                    "parsed": chosen[-1],
                }
            )
        consistent.append(chosen[0] is not None and all(c == chosen[0] for c in chosen))
        other = labels[int(rng.integers(len(labels) - 1))]
        other = other if other != label else labels[-1]
        for target, truth in ((label, True), (other, False)):
            answer = model.ask(image, yesno_question(names[target]), mpp=mpps[i], **gen)
            parsed = parse_yesno(answer)
            yn_correct.append(parsed is truth)
            records.append(
                {
                    "path": str(data.paths[i]),
                    "label": label,
                    "type": "yesno",
                    "asked": target,
                    "answer": answer,
                    "parsed": parsed,
                }
            )
    all_correct = mc_correct + yn_correct
    result: dict[str, Any] = {
        "task": "vqa",
        **model_info,
        "data": str(data_source),
        "n": len(data),
        "accuracy": float(np.mean(all_correct)),
        "mc_accuracy": float(np.mean(mc_correct)),
        "yesno_accuracy": float(np.mean(yn_correct)),
        "option_order_consistency": float(np.mean(consistent)),
        # answers that name an option and write a letter: share whose letter is that option's
        "mc_letter_matches_name": float(np.mean(letters)) if letters else float("nan"),
        "n_questions": len(all_correct),
        **scale_summary(data.paths, mpps, tile_scale(model)),
        "n_orders": n_orders,
        "answered_by": "chat (closed questions about scored classes: the scores; others: the LLM)"
        if cfg.route else "LLM only (route=False)",
        "decoding": {k: v for k, v in gen.items() if k != "route"},
        "prompts": {
            "class_names": names,
            "mc_template": mc_question(["<option>", "..."]),
            "yesno_template": yesno_question("<class>"),
        },
        "split": cfg.split,
    }
    if json_path is not None:
        import json

        json_path = Path(json_path)
        answers = json_path.with_name(json_path.stem + "_answers.jsonl")
        answers.parent.mkdir(parents=True, exist_ok=True)
        answers.write_text("".join(json.dumps(r) + "\n" for r in records))
        result["files"] = {
            "json": str(json_path),
            "markdown": str(json_path.with_suffix(".md")),
            "answers": str(answers),
        }
        write_report(result, json_path)
    return result
