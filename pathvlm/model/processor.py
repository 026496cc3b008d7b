"""Render a chat (history + question + slides) to token ids with the LLM's own chat template.

Each slide is introduced by a text marker naming it (``Slide 2 (IHC: cyclin D1) B1:``) and then
``<slide>`` placeholders, expanded to exactly that slide's number of tokens. The placeholder is
a special token added to the tokenizer only (id >= the LLM vocab): the model swaps it for the
pad id before the embedding lookup and overwrites those positions with ``masked_scatter``, so a
frozen LLM's vocabulary and embedding matrix never change. The text markers and a newline after
each slide's tokens are the slide boundaries (no extra learned boundary token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pathvlm.errors import ModelError

SLIDE_TOKEN = "<slide>"
ROLES = ("system", "user", "assistant")


@dataclass
class SlideSlot:
    """One slide's place in the prompt: its marker text and how many tokens it gets."""

    name: str | None
    stain: str | None
    part: str | None
    n_tokens: int

    def marker(self, index: int, total: int) -> str:
        label = f"Slide {index}" if total > 1 else "Slide"
        extra = ", ".join(x for x in (self.stain, f"part {self.part}" if self.part else None) if x)
        if extra:
            label += f" ({extra})"
        if self.name:
            label += f" {self.name}"
        return label + ":"


def add_slide_token(tokenizer: Any) -> int:
    """Register ``<slide>`` as a special token (idempotent) and return its id."""
    if SLIDE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([SLIDE_TOKEN], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(SLIDE_TOKEN))


def slide_block(slots: list[SlideSlot]) -> str:
    """Markers and placeholders for all slides of a case, one slide per line."""
    return "\n".join(f"{s.marker(i + 1, len(slots))} {SLIDE_TOKEN * s.n_tokens}"
                     for i, s in enumerate(slots))


def check_history(history: list[dict[str, str]] | None) -> list[dict[str, str]]:
    out = []
    for i, turn in enumerate(history or []):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ModelError(f"history[{i}]: expected {{'role': system|user|assistant, 'content': str}}, "
                             f"got {turn!r}")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def build_messages(question: str, slots: list[SlideSlot], history: list[dict[str, str]] | None = None,
                   system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages with the slide block in the first user turn (so it stays in context).

    ``<slide>`` written in a turn marks where the slide block goes; otherwise it leads the turn.
    """
    messages = check_history(history)
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": question})
    if not slots:
        if any(SLIDE_TOKEN in m["content"] for m in messages):
            raise ModelError(f"the prompt holds {SLIDE_TOKEN} but no slide was given")
        return messages
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    text = messages[first]["content"]
    block = slide_block(slots)
    if text.count(SLIDE_TOKEN) > 1:
        raise ModelError(f"write {SLIDE_TOKEN} at most once; it expands to all {len(slots)} slide(s)")
    messages[first] = {"role": "user",
                       "content": text.replace(SLIDE_TOKEN, block) if SLIDE_TOKEN in text else f"{block}\n{text}"}
    return messages


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> torch.Tensor:
    """Token ids [1, L] of the messages under the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError("the LLM tokenizer has no chat template; use an instruction-tuned LLM")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        return_tensors="pt", return_dict=True)
    return out["input_ids"]


def check_roles(messages: list[dict[str, str]]) -> None:
    """An optional system turn, then user/assistant alternating from user, ending on assistant."""
    body = messages[1:] if messages and messages[0].get("role") == "system" else messages
    if not body:
        raise ModelError("a training conversation needs at least one user and one assistant turn")
    for i, msg in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(msg, dict) or msg.get("role") != want or not isinstance(msg.get("content"), str):
            got = msg.get("role") if isinstance(msg, dict) else type(msg).__name__
            raise ModelError(f"message {i + len(messages) - len(body)}: expected role {want!r} "
                             f"(system?, then user/assistant alternating), got {got!r}")
    if body[-1]["role"] != "assistant":
        raise ModelError("a training conversation must end with an assistant turn")


def render_conversation(tokenizer: Any, messages: list[dict[str, str]], slots: list[SlideSlot],
                        system_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [L] and labels [L] of a whole conversation; labels are -100 except assistant turns.

    The first user turn's ``<slide>`` expands to the slide block exactly as at inference
    (``build_messages``). Each assistant turn's tokens are found by rendering the prefix up to its
    generation prompt and the prefix including it; a template whose prefixes are not stable (the
    shorter render is not a prefix of the longer) is an error rather than a silently wrong mask.
    """
    check_roles(messages)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError("the LLM tokenizer has no chat template; use an instruction-tuned LLM")
    *history, last = messages
    # the last turn is an assistant turn, so build_messages' "question" is the last user turn
    msgs = build_messages(history[-1]["content"], slots, history[:-1], system_prompt) + [last]

    def ids_of(part: list[dict[str, str]], gen_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(part, add_generation_prompt=gen_prompt, return_dict=True)
        return list(out["input_ids"])

    ids = ids_of(msgs, False)
    labels = [-100] * len(ids)
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        start, end = ids_of(msgs[:i], True), ids_of(msgs[: i + 1], False)
        if ids[: len(end)] != end or end[: len(start)] != start:
            raise ModelError("the chat template does not render conversations prefix-stably; "
                             "cannot locate assistant turns for the loss mask")
        labels[len(start): len(end)] = ids[len(start): len(end)]
    return torch.tensor(ids), torch.tensor(labels)
