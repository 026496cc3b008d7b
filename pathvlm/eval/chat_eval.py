"""`pathvlm eval chat`: held-out questions of every chat type, answered and checked automatically.

Questions come from instruction files built from the val splits (`pathvlm data build`: the
question, its type, the synthetic case of case-fact records) and from the packaged example cases,
half of them reworded with phrasings no training template uses, so the router is tested on
wording it was not written against. Each answer gets its type's check:

- facts: names every slide / stain / part / entered result the case holds for the question;
- out_of_scope: a refusal that says what is missing;
- next_steps: at least one test that separates the report's top two entities (tissue classes:
  the class file's next steps);
- classify: its top entity is the report's (the same input drafted independently here);
- followup: "second" names the report's second entity; "why not X" names X and ranks it as the
  report does;
- describe / region / adequacy (LLM answers): the asked form, and no entity or tissue class
  other than the report's top named (does not contradict the report).

Per type: accuracy with a bootstrap 95% CI (resampled by image). Separately, every val image is
asked for its differential and the chat's top entity is compared with the report's.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathvlm.data import dialogue as dlg
from pathvlm.data.conversations import CHAT_TYPES
from pathvlm.data.formats import SLIDE_TOKEN, read_conversations
from pathvlm.errors import ConfigError, PathVLMError
from pathvlm.eval.metrics import bootstrap_ci

log = logging.getLogger(__name__)

# held-out wordings: never in dialogue's training templates
PARAPHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "facts": {"slides": ("How many slides does this case have?", "Name the slides in this case."),
              "immunostain": ("Which slide has the IHC?", "Where is the immunohistochemistry slide?"),
              "he": ("Which one is the H&E slide?",),
              "marker_slide": ("Which slide has the {marker} stain?",),
              "stains": ("Which stains does this case include?",),
              "parts": ("What parts were submitted?",),
              "results": ("What ancillary results have been entered?",),
              "marker_result": ("Was {marker} positive?", "What did {marker} show?")},
    "out_of_scope": {"prognosis": ("What is the expected survival for this patient?",),
                     "treatment": ("What therapy do you recommend?",),
                     "identity": ("Whose biopsy is this?",),
                     "clinical": ("What is the patient's disease stage?",)},
    "next_steps": {"": ("What workup would you order next?", "Which markers should be done to confirm?")},
    "classify": {"": ("What's your diagnosis?", "What is the most likely entity here?")},
}
REFUSAL = re.compile(r"\b(can't|cannot|can not|unable to|not able to) answer\b", re.IGNORECASE)
ADEQUACY = re.compile(r"(Adequate|Limited|Inadequate)\b")  # the leading verdict of an adequacy answer
# a claim of what the field is ("most consistent with X"), as opposed to describing cells in words
CLAIM = re.compile(r"(?:consistent with|most likely|suggestive of|diagnosis of|diagnostic of|in keeping with|"
                   r"the (?:image|field) shows|this is|represents)\s+(?:an?\s+)?([^.;,]+)", re.IGNORECASE)
OOS_NAMES = {"prognosis": "prognosis", "treatment": "treatment", "identity": "identity", "clinical": "clinical"}


@dataclass
class ChatEvalConfig:
    """Options of `pathvlm eval chat`."""

    per_type: int = 30  # questions per type and data file (0: all)
    cases: tuple[str, ...] | None = None  # packaged case names (None: all that load)
    paraphrase: float = 0.5  # share of questions reworded with held-out phrasings
    consistency_limit: int | None = None  # val images in the top-entity comparison (None: all)
    max_new_tokens: int = 60
    n_boot: int = 1000
    seed: int = 0


@dataclass
class Item:
    type: str
    kind: str | None
    input: Any
    question: str
    case: Any = None  # Case or CaseFacts
    first: str | None = None  # follow-ups: the first question
    label: str | None = None
    group: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _strip(text: str) -> str:
    return text.replace(SLIDE_TOKEN, "").strip()


def _reword(item: Item, rng: random.Random, share: float) -> None:
    options = PARAPHRASES.get(item.type, {}).get(item.kind or "")
    if options and rng.random() < share:
        item.question = rng.choice(options).format(marker=item.meta.get("marker") or "CD5")
        item.meta["paraphrase"] = True


def items_from_records(path: str | Path, cfg: ChatEvalConfig, rng: random.Random) -> list[Item]:
    """Questions of every chat type from one instruction file, at most `per_type` per type."""
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in read_conversations(path):
        if rec.get("task") in CHAT_TYPES:
            by_type[rec["task"]].append(rec)
    out = []
    for kind, recs in sorted(by_type.items()):
        if cfg.per_type:
            recs = rng.sample(recs, min(cfg.per_type, len(recs)))
        for rec in recs:
            msgs, image = rec["messages"], rec.get("image") or rec.get("slide") or rec.get("features")
            question = _strip(msgs[0]["content"])
            item = Item(kind, rec.get("kind") or rec.get("aspect"), image, question, label=rec.get("label"),
                        group=rec.get("specimen") or image, source=Path(path).name,
                        meta={k: rec[k] for k in ("marker", "asked_slide", "asked", "aspect", "adequacy") if k in rec})
            if kind == "facts":
                item.case = dlg.CaseFacts.from_dict(rec["case"])
                item.question = question.split("\n", 1)[1]  # the case reaches the chat as data, not text
            elif kind == "followup":
                item.first, item.question = question, msgs[2]["content"]
            if kind in ("facts", "out_of_scope", "next_steps", "classify"):
                _reword(item, rng, cfg.paraphrase)
            out.append(item)
    return out


def items_from_cases(names: tuple[str, ...] | None) -> tuple[list[Item], list[str]]:
    """Case-fact, refusal, next-steps and classify questions on the packaged example cases."""
    from pathvlm.case import load_case
    from pathvlm.resources import list_resources, resource_file

    out, skipped = [], []
    for name in names if names is not None else list_resources("cases"):
        try:
            case = load_case(resource_file("cases", name))
        except PathVLMError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        facts = dlg.CaseFacts.from_case(case)
        markers = [s.marker for s in facts.slides if s.marker] + [r.target for r in facts.results][:2]
        src = f"case:{case.id}"
        for kind, questions in dlg.FACT_QUESTIONS.items():
            pairs = [(text, m) for text in (*questions, *PARAPHRASES["facts"].get(kind, ()))
                     for m in (markers[:2] if "{marker}" in text else [None])]
            for text, marker in pairs:
                slide = facts.slides[-1].name if "{slide}" in text else None
                out.append(Item("facts", kind, case, text.format(marker=marker, slide=slide), case=case,
                                group=src, source=src, meta={"marker": marker, "asked_slide": slide,
                                                             "paraphrase": text not in questions}))
        asked = [("out_of_scope", kind, (*questions, *PARAPHRASES["out_of_scope"][kind]), questions)
                 for kind, (questions, _) in dlg.OUT_OF_SCOPE.items()]
        asked += [("next_steps", None, (*dlg.QUESTIONS["next_steps"], *PARAPHRASES["next_steps"][""]),
                   dlg.QUESTIONS["next_steps"]),
                  ("classify", None, (*dlg.QUESTIONS["classify"][:2], *PARAPHRASES["classify"][""]),
                   dlg.QUESTIONS["classify"])]
        for t, kind, texts, trained in asked:
            out += [Item(t, kind, case, q, case=case, group=src, source=src, meta={"paraphrase": q not in trained})
                    for q in texts]
    return out, skipped


class Reference:
    """What the report says for an input (drafted independently of the chat), cached per input."""

    def __init__(self, model: Any):
        self.model, self.cache = model, {}

    def ranked(self, item: Item, domain: str) -> list[tuple[str, float]]:
        from pathvlm.case import Case

        real = item.case if isinstance(item.case, Case) else None
        key = (str(item.input if not isinstance(item.input, Case) else item.input.id), domain)
        if key not in self.cache:
            if domain == "lymphoma":
                report = self.model.draft_report(item.input, "lymphoma", case=real,
                                                 findings_config=self.model.chat.findings_config)
                self.cache[key] = [(d.entity, d.probability) for d in report.morphologic_differential]
            else:
                from pathvlm.scoring import score

                self.cache[key] = self.model.chat._tissue(score(self.model, real or item.input))
        return self.cache[key]


def _names(model: Any, domain: str) -> dict[str, str]:
    """Every way an answer may name an entity / tissue class -> its key."""
    out: dict[str, str] = {}
    for key, info in model.chat.class_info.items():
        is_entity = dlg.entity_of(info.label) is not None
        if (domain == "lymphoma") != is_entity:
            continue
        for n in (key, info.name, *info.synonyms):
            out[n.casefold()] = key
    return out


def _named(text: str, names: dict[str, str]) -> list[str]:
    """Keys named in `text`, in order of first mention (longest names first, no overlaps)."""
    low, hits = text.casefold(), []
    taken = np.zeros(len(low), dtype=bool)
    for n in sorted(names, key=len, reverse=True):
        for m in re.finditer(rf"(?<![\w-]){re.escape(n)}(?![\w-])", low):
            if not taken[m.start():m.end()].any():
                taken[m.start():m.end()] = True
                hits.append((m.start(), names[n]))
    return list(dict.fromkeys(k for _, k in sorted(hits)))


def fact_expectations(kind: str, facts: dlg.CaseFacts, marker: str | None, slide: str | None) -> list[str]:
    """Strings a correct answer must contain: the case's own names, stains and results."""
    if kind == "slides":
        return [s.name for s in facts.slides]
    if kind in ("immunostain", "he"):
        hits = [s.name for s in facts.slides if (s.marker is None) == (kind == "he")]
        return hits or ["No slide"]
    if kind == "stains":
        return [s.stain for s in facts.slides]
    if kind == "parts":
        if slide:
            hit = next((s for s in facts.slides if s.name == slide), None)
            return [hit.part] if hit and hit.part else [slide]
        return sorted({s.part for s in facts.slides if s.part}) or ["No parts"]
    if kind == "results":
        return [r.text() for r in facts.results] or ["No ancillary results"]
    if kind == "marker_slide":
        return [s.name for s in facts.slides_for(marker or "")] or [f"No slide in this case is stained for {marker}"]
    if kind == "marker_result":
        r = facts.result_for(marker or "")
        return [r.text()] if r else [f"No {marker} result"]
    raise ConfigError(f"unknown case-fact kind {kind!r}")


def check(item: Item, answer: str, reply: Any, ref: Reference, model: Any) -> dict[str, Any]:
    """This item's check: {"ok": bool, ...details}."""
    from pathvlm.chat import case_facts

    t = item.type
    if t == "facts":
        facts = case_facts(item.input, item.case)
        route = reply.route
        kind = route.detail if route.kind == "facts" else item.kind
        want = fact_expectations(kind, facts, route.marker or item.meta.get("marker"),
                                 route.slide or item.meta.get("asked_slide"))
        return {"ok": route.kind == "facts" and all(w in answer for w in want), "expected": want}
    if t == "out_of_scope":
        ok = bool(REFUSAL.search(answer)) and OOS_NAMES[item.kind or "clinical"] in answer.lower()
        return {"ok": ok}
    domain = reply.domain
    if domain not in ("lymphoma", "tissue"):  # LLM-answered types carry none: the chat's own pick
        domain = model.chat.scores(item.input, item.case, item.question)[0]
    domain = domain if domain in ("lymphoma", "tissue") else "tissue"
    ranked = ref.ranked(item, domain)
    names = _named(answer, _names(model, domain))
    top = ranked[0][0] if ranked else None
    out: dict[str, Any] = {"domain": domain, "report_top": top, "named": names}
    if t == "classify":
        out["ok"] = bool(names) and names[0] == top and bool(reply.differential) and reply.differential[0][0] == top
        label = dlg.entity_of(item.label) if item.label and domain == "lymphoma" else item.label
        out["label_correct"] = None if label is None else top == label
    elif t == "next_steps" or (t == "followup" and item.kind == "separate"):
        out.update(_steps_check(item, answer, domain, ranked, model))
    elif t == "followup":
        if item.kind == "second":
            second = ranked[1][0] if len(ranked) > 1 else None
            out["ok"] = second is not None and len(names) >= 1 and names[0] == second
        else:
            asked = item.meta.get("asked")
            key = dlg.entity_of(asked) if domain == "lymphoma" and asked else asked
            in_list = key in [k for k, _ in ranked]
            if key is None or not in_list:
                out["ok"] = "not among" in answer or (bool(names) and names[0] == key)
            elif key == top:
                out["ok"] = bool(names) and names[0] == key and "most likely" in answer
            else:
                out["ok"] = bool(names) and names[0] == key and "less likely" in answer and top in names
    else:  # LLM answers: the asked form, and no claim of another entity than the report's top
        claimed = _named(" ".join(CLAIM.findall(answer)), _names(model, domain))
        contradicts = any(n != top for n in claimed)
        if t == "describe":
            aspect = item.meta.get("aspect")
            form = answer.startswith(dlg.ASPECTS[aspect]) if aspect else bool(answer.strip())
        elif t == "region":
            form = answer.startswith("In the zoomed region")
        else:  # adequacy
            lead = ADEQUACY.match(answer)  # "Adequate for a morphologic impression: ...", "Limited: ..."
            form = bool(lead) and lead.group(1) == (item.meta.get("adequacy") or "Adequate")
        out.update(ok=form and not contradicts, form=form, contradicts=contradicts)
    return out


def _steps_check(item: Item, answer: str, domain: str, ranked: list[tuple[str, float]], model: Any) -> dict:
    """At least one test that separates the report's top two (lymphoma), or the top tissue class's
    next steps from its class file."""
    from pathvlm.chat import case_facts

    if domain == "lymphoma" and len(ranked) > 1:
        entered = {r.target for r in case_facts(item.input, item.case).results}
        markers = [m for m, _, _ in dlg.separating_tests(ranked[0][0], ranked[1][0]) if m not in entered]
        ok = any(f"{m} (" in answer for m in markers) if markers else "already cover" in answer
        return {"ok": ok, "markers": markers}
    info = model.chat.class_info.get(ranked[0][0] if ranked else "")
    want = (info.next_steps or info.confirm) if info else None
    return {"ok": answer.startswith("Next steps:") and (want is None or want in answer)}


def _ci(values: list[bool], groups: list[str], cfg: ChatEvalConfig) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return bootstrap_ci(lambda idx: float(arr[idx].mean()), len(arr), groups, cfg.n_boot, cfg.seed)


def top_entity_agreement(model: Any, images: list[str], ref: Reference) -> dict[str, Any]:
    """For every image: the chat's top entity for "What is the most likely diagnosis?" equals the
    report's (lymphoma report, or the colorectal tissue head) in the domain the chat chose."""
    rows = []
    for path in images:
        reply = model.chat.reply(path, "What is the most likely diagnosis?")
        if reply.domain not in ("lymphoma", "tissue"):
            continue
        top = ref.ranked(Item("classify", None, path, ""), reply.domain)[0][0]
        rows.append({"image": path, "domain": reply.domain, "chat": reply.differential[0][0], "report": top})
    agree = [r["chat"] == r["report"] for r in rows]
    by_domain = {d: sum(r["domain"] == d for r in rows) for d in ("lymphoma", "tissue")}
    return {"n": len(rows), "agree": int(sum(agree)), "rate": float(np.mean(agree)) if rows else float("nan"),
            "by_domain": by_domain, "disagreements": [r for r, a in zip(rows, agree) if not a]}


def run_chat_eval(model: Any, data: list[str], cfg: ChatEvalConfig, model_info: dict[str, Any],
                  json_path: str | Path | None = None) -> dict[str, Any]:
    """Ask every held-out question, check each answer, and summarise per type."""
    rng = random.Random(cfg.seed)
    items: list[Item] = []
    for path in data:
        items += items_from_records(path, cfg, rng)
    case_items, skipped = items_from_cases(cfg.cases)
    items += case_items
    if not items:
        raise ConfigError(f"{', '.join(data)}: no chat-type questions (build them with `pathvlm data build`)")
    ref, records = Reference(model), []
    gen = {"max_new_tokens": cfg.max_new_tokens, "do_sample": False}
    # answers so far, one line each, so a long run on a busy machine can be inspected before it ends
    partial = Path(json_path).with_name(Path(json_path).stem + "_answers.partial.jsonl") if json_path else None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
    for i, item in enumerate(items):
        history = None
        if item.first is not None:
            first = model.ask(item.input, item.first, case=item.case, **gen)
            history = [{"role": "user", "content": item.first}, {"role": "assistant", "content": first}]
        reply = model.chat.reply(item.input, item.question, history, item.case)
        answer = reply.text if reply.text is not None else model.ask(
            item.input, item.question, history, case=item.case, route=False, **gen)
        result = check(item, answer, reply, ref, model)
        records.append({"type": item.type, "kind": item.kind, "source": item.source, "group": item.group,
                         "input": str(item.input if isinstance(item.input, (str, Path)) else "case"),
                         "question": item.question, "route": reply.route.kind, "answer": answer, **result,
                         **({"paraphrase": True} if item.meta.get("paraphrase") else {})})
        if partial is not None:
            with partial.open("a") as fh:
                fh.write(json.dumps(records[-1], default=str) + "\n")
        if (i + 1) % 25 == 0:
            log.info("chat eval: %d/%d questions", i + 1, len(items))
    per_type = {}
    for t in CHAT_TYPES:
        rows = [r for r in records if r["type"] == t]
        if not rows:
            continue
        ok = [bool(r["ok"]) for r in rows]
        lo, hi = _ci(ok, [r["group"] for r in rows], cfg)
        entry = {"n": len(rows), "accuracy": float(np.mean(ok)), "ci95": [lo, hi],
                 "routed_as_asked": float(np.mean([r["route"] == t or (t == "followup" and r["route"] in
                                                   ("followup", "next_steps")) for r in rows]))}
        paraphrased = [bool(r["ok"]) for r in rows if r.get("paraphrase")]
        if paraphrased:
            entry["accuracy_paraphrased"] = float(np.mean(paraphrased))
            entry["n_paraphrased"] = len(paraphrased)
        labelled = [r["label_correct"] for r in rows if r.get("label_correct") is not None]
        if labelled:
            entry["label_accuracy"] = float(np.mean(labelled))
        per_type[t] = entry
    images = sorted({str(it.input) for it in items if isinstance(it.input, str)})
    if cfg.consistency_limit:
        images = images[: cfg.consistency_limit]
    agreement = top_entity_agreement(model, images, ref)
    result: dict[str, Any] = {"task": "chat", **model_info, "data": [str(d) for d in data], "n": len(records),
                              "per_type": per_type, "top_entity_agreement": agreement,
                              "cases_skipped": skipped, "decoding": gen, "config": vars(cfg)}
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        answers = json_path.with_name(json_path.stem + "_answers.jsonl")
        answers.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        partial.unlink(missing_ok=True)
        md = json_path.with_suffix(".md")
        result["files"] = {"json": str(json_path), "markdown": str(md), "answers": str(answers)}
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        md.write_text(to_markdown(result))
    return result


def to_markdown(result: dict[str, Any]) -> str:
    lines = ["# pathvlm eval chat", "", f"- model: `{result.get('model')}`", f"- data: {', '.join(result['data'])}",
             f"- questions: {result['n']}", "", "| type | n | accuracy | 95% CI | held-out wording | routed as asked |",
             "|---|---|---|---|---|---|"]
    for t, e in result["per_type"].items():
        para = f"{e['accuracy_paraphrased']:.3f} (n={e['n_paraphrased']})" if "accuracy_paraphrased" in e else ""
        lines.append(f"| {t} | {e['n']} | {e['accuracy']:.3f} | {e['ci95'][0]:.3f} - {e['ci95'][1]:.3f} | {para} | "
                     f"{e['routed_as_asked']:.3f} |")
    a = result["top_entity_agreement"]
    lines += ["", (f"Chat top entity == report top entity: {a['agree']}/{a['n']} images "
              f"(lymphoma differential {a['by_domain']['lymphoma']}, tissue classes {a['by_domain']['tissue']}).")]
    if "label_accuracy" in result["per_type"].get("classify", {}):
        lines.append(f"Classify: top entity == label on {result['per_type']['classify']['label_accuracy']:.3f} "
                     "of labelled questions.")
    if result.get("cases_skipped"):
        lines += ["", "Cases skipped: " + "; ".join(result["cases_skipped"])]
    return "\n".join(lines) + "\n"
