"""The ``pathvlm`` command line. The only module that sees argparse; it calls library functions.

Each sub-command is one ``_add_<name>(sub)`` function that builds its parser and sets
``func`` to a handler taking the parsed namespace. Handlers print; the library logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from pathvlm import __version__
from pathvlm.errors import PathVLMError

EXIT_BAD_INPUT = 2


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered components")
    p.add_argument("what", choices=sorted(_LISTERS), help="which registry to list")
    p.add_argument("--json", action="store_true", help="print JSON (encoders: every registry field)")
    p.set_defaults(func=_cmd_list)


def _list_encoders(as_json: bool = False) -> list[str]:
    import dataclasses
    import json

    from pathvlm.encoders import list_encoders

    entries = list_encoders(details=True)
    if as_json:
        return [json.dumps([dataclasses.asdict(e) for e in entries], indent=2)]
    header = (f"{'NAME':24s} {'DIM':>5s} {'UM/PX':>5s} {'INPUT':>5s} {'TEXT':4s} {'ACCESS':6s} "
              f"{'LICENCE':32s} DESCRIPTION")
    rows = [header]
    for e in entries:
        def cell(v, fmt): return (format(v, fmt) if v is not None else "-").rjust(5)
        note = "random weights (seeded): " if e.random_weights else ""
        rows.append(f"{e.name:24s} {cell(e.embed_dim, '>5d')} {cell(e.mpp, '>5.2f')} "
                    f"{cell(e.input_size, '>5d')} {'yes' if e.has_text else 'no':4s} "
                    f"{'gated' if e.gated else 'open':6s} {e.license[:32]:32s} {note}{e.description}")
    return rows


def _list_report_types() -> list[str]:
    from pathvlm.reports import get_report_type, list_report_types

    return [f"{name:24s} {get_report_type(name).title}" for name in list_report_types()]


def _list_heads() -> list[str]:
    from pathvlm.scoring import HEADS

    return [f"{h.name:18s} {h.description}" for h in HEADS.values()]


def _list_stages() -> list[str]:
    from pathvlm.train import list_stages

    return list_stages()


def _list_aggregators() -> list[str]:
    from pathvlm.model import list_aggregators

    return list_aggregators()


def _list_projectors() -> list[str]:
    from pathvlm.model import list_projectors

    return list_projectors()


def _list_models() -> list[str]:
    from pathvlm.model.loading import list_models

    return list_models()


def _packaged(kind: str) -> Callable[[], list[str]]:
    def rows() -> list[str]:
        from pathvlm.resources import list_resources, resource_file

        return [f"{name:24s} {resource_file(kind, name)}" for name in list_resources(kind)]

    return rows


# registry name -> function returning printable rows; other registries add themselves here
_LISTERS: dict[str, Callable[[], list[str]]] = {
    "aggregators": _list_aggregators,
    "projectors": _list_projectors,
    "encoders": _list_encoders,
    "heads": _list_heads,
    "models": _list_models,
    "reports": _list_report_types,
    "stages": _list_stages,
    # packaged files, usable by name: --prompts NAME, --classes NAME, train -c NAME, load_case(NAME)
    "prompts": _packaged("prompts"),
    "classes": _packaged("classes"),
    "configs": _packaged("configs"),
    "cases": _packaged("cases"),
}


def _cmd_list(args: argparse.Namespace) -> int:
    lister = _LISTERS[args.what]
    if args.json and lister is _list_encoders:
        rows = _list_encoders(as_json=True)
    elif args.json:
        import json

        rows = [json.dumps(lister(), indent=2)]
    else:
        rows = lister()
    for row in rows:
        print(row)
    return 0


def _add_schema(sub: argparse._SubParsersAction) -> None:
    from pathvlm.reports import list_report_types

    p = sub.add_parser("schema", help="print the JSON Schema of a report type")
    p.add_argument("--type", dest="report_type", required=True, choices=list_report_types())
    p.set_defaults(func=_cmd_schema)


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from pathvlm.reports import report_json_schema

    print(json.dumps(report_json_schema(args.report_type), indent=2))
    return 0


def _add_precision(p: argparse.ArgumentParser) -> None:
    from pathvlm.precision import ENV_VAR, PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"numeric precision; auto (default, or ${ENV_VAR}): bf16 where the hardware runs "
                   "it fast (CPU with AVX512-BF16/AMX, bf16 GPU), else fp16 on CUDA, else fp32")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")


def _add_embed(sub: argparse._SubParsersAction) -> None:
    from pathvlm.embed import EmbedConfig

    d = EmbedConfig()
    p = sub.add_parser("embed", help="encode slide tiles into one <out>/<slide stem>.h5 per slide")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files, folders, .txt lists or globs")
    p.add_argument("--out", required=True, help="output folder for feature files")
    p.add_argument("--encoder", default=d.encoder,
                   help="registered name (pathvlm list encoders), openclip:<arch>[@ckpt], local-dir:<dir>, "
                   f"checkpoint file or hf-hub:<org/repo> (default: the default model's, {d.encoder})")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="foundation encoder weights: its hub folder copied as is, or its weights file "
                   "(default: download from the hub with HF_TOKEN)")
    p.add_argument("--mpp", type=float, default=None,
                   help="tile resolution in um/px (default: the encoder's training scale, else 0.5)")
    p.add_argument("--size", type=int, default=None,
                   help="tile size in pixels (default: the encoder's training tile, else its input)")
    p.add_argument("--slide-mpp", type=float, default=None, help="um/px of files that do not record it")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="tile-reading processes")
    p.add_argument("--shard", default=None, metavar="I/N", help="process shard I of N (0-based)")
    _add_device(p)
    _add_precision(p)
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    from pathvlm.embed import EmbedConfig, embed_slides

    cfg = EmbedConfig(
        encoder=args.encoder, weights=args.weights, mpp=args.mpp, size=args.size, slide_mpp=args.slide_mpp,
        batch_size=args.batch_size, num_workers=args.num_workers, shard=args.shard,
        device=args.device, progress=not args.quiet, precision=args.precision or "auto",
    )
    result = embed_slides(args.slides, args.out, cfg)
    print(f"embedded {len(result.written)}, skipped {len(result.skipped)} complete, "
          f"failed {len(result.failed)}")
    for _path, reason in result.failed:
        print(f"failed: {reason}", file=sys.stderr)
    return EXIT_BAD_INPUT if result.failed else 0


def _train_parser() -> argparse.ArgumentParser:
    from pathvlm.train import list_stages

    p = argparse.ArgumentParser(prog="pathvlm train", description="train a stage on the shared accelerate loop")
    p.add_argument("stage", choices=list_stages(), help="which stage to train")
    p.add_argument("-c", "--config", help="stage config: a YAML file or a packaged name "
                   "(pathvlm list configs, e.g. clip_demo)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    _add_precision(p)  # = train.mixed_precision (accelerate; fp32 master weights)
    return p


def _add_train(sub: argparse._SubParsersAction) -> None:
    # argparse cannot match a "*" positional that follows -c, so the words after `train` are
    # parsed again, intermixed, by _train_parser
    inner = _train_parser()
    p = sub.add_parser("train", help="train a stage (clip, mil, align, instruct) on the shared accelerate loop",
                       usage=inner.format_usage()[len("usage: "):],
                       description=inner.format_help().split("\n", 2)[-1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from pathvlm.train import train_stage

    parsed = _train_parser().parse_intermixed_args(args.argv)
    overrides = list(parsed.overrides)
    if parsed.precision:
        overrides.append(f"train.mixed_precision={parsed.precision}")
    out = train_stage(parsed.stage, parsed.config, overrides)
    print(f"run directory: {out}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    from pathvlm.data.builders import DEFAULT_TASKS, TASKS, BuildConfig

    p = sub.add_parser("data", help="build and check training data files")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = data_sub.add_parser("build", help="labelled folder or index CSV + class YAML -> pairs/instruction JSONL")
    b.add_argument("source", help="index CSV (path,label[,specimen][,split]) or a folder of <label>/<image>")
    b.add_argument("--classes", required=True, help="class description YAML, or a packaged name (pathvlm list classes, e.g. lymphoma)")
    b.add_argument("-o", "--out", required=True, help="output folder")
    b.add_argument("--val-fraction", type=float, default=0.2, help="when the index has no split column")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--captions-per-image", type=int, default=1, help="description captions per image")
    b.add_argument("--named-captions", type=int, default=1,
                   help="extra pairs per image whose text names the class (class templates x name/synonyms)")
    b.add_argument("--closed-per-image", type=int, default=BuildConfig.closed_per_image,
                   help="yes/no and multiple-choice records per image (fresh option order each)")
    b.add_argument("--mc-options", type=int, default=BuildConfig.mc_options,
                   help="options per multiple-choice question (0: 2 to all classes at random)")
    b.add_argument("--case-pattern", default="", help="regex naming the case within a specimen id "
                   "(specimens of one case stay in one split)")
    b.add_argument("--max-per-class", type=int, default=0,
                   help="at most N images per class and split (seeded sample; 0 = all)")
    b.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"instruction kinds, comma separated ({','.join(TASKS)})")
    b.add_argument("--chat-per-image", type=int, default=BuildConfig.chat_per_image,
                   help="chat-type conversations per image (a window rotating over the chat types in --tasks)")
    b.set_defaults(func=_cmd_data_build)
    c = data_sub.add_parser("check", help="validate a pairs JSONL, instruction JSONL or MIL CSV")
    c.add_argument("kind", choices=["pairs", "instruct", "mil"])
    c.add_argument("path")
    c.set_defaults(func=_cmd_data_check)


def _cmd_data_build(args: argparse.Namespace) -> int:
    from pathvlm.data import BuildConfig, build_datasets

    tasks = tuple(t for t in args.tasks.split(",") if t)
    cfg = BuildConfig(classes=args.classes, val_fraction=args.val_fraction, seed=args.seed,
                      captions_per_image=args.captions_per_image,
                      named_captions=args.named_captions, closed_per_image=args.closed_per_image,
                      mc_options=args.mc_options, chat_per_image=args.chat_per_image,
                      tasks=tasks, case_pattern=args.case_pattern, max_per_class=args.max_per_class)
    summary = build_datasets(args.source, args.out, cfg)
    for split, info in summary["splits"].items():
        print(f"{split:10s} images {info['images']:5d}  pairs {info['pairs']:5d}  instructions {info['instructions']:5d}")
    print(f"written to {args.out}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from pathvlm.data import read_conversations, read_mil_csv, read_pairs

    reader = {"pairs": read_pairs, "instruct": read_conversations, "mil": read_mil_csv}[args.kind]
    print(f"{args.path}: {len(reader(args.path))} valid records")
    return 0


DEFAULT_EVAL_MODEL = "demo"


def _add_mpp(p: argparse.ArgumentParser, what: str = "plain images") -> None:
    p.add_argument("--mpp", type=_positive_float, default=None, metavar="UM_PER_PX",
                   help=f"pixel size of {what} (tiles, photos; also slide files that record none); "
                   "they are resampled to the model's tile scale. Without it they are assumed to be "
                   "at that scale, and the output says so")


def _add_views(p: argparse.ArgumentParser) -> None:
    # = patch_encoder.TEST_VIEWS, written out: building the parser imports no torch
    p.add_argument("--test-views", type=int, choices=(1, 2, 4, 8), default=None, metavar="N",
                   help="embed each plain-image tile in N turns and mirror images (1, 2, 4 or 8) and "
                   "average them; default: what the encoder records (the demo model's: see MODEL_CARD.md)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _print_notes(notes: Sequence[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _add_zeroshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot classify images, slides or feature files")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders, slides or .h5 feature files")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--classes", help='comma-separated class names, e.g. "tumour,stroma,fat"')
    group.add_argument("--prompts", help="CONCH-style prompt file, or a packaged name "
                       "(pathvlm list prompts, e.g. crc_tissue)")
    p.add_argument("--model", default=DEFAULT_EVAL_MODEL,
                   help="model name/dir for load_model, or encoder:<encoder name> for a bare encoder")
    p.add_argument("--top-k", type=int, default=10, help="tiles pooled per class for slide predictions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    _add_precision(p)
    _add_device(p)
    _add_mpp(p)
    _add_views(p)
    p.set_defaults(func=_cmd_zeroshot)


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    import json

    from pathvlm.eval.common import load_eval_model
    from pathvlm.zeroshot import ZeroShotClassifier

    model = load_eval_model(args.model, precision=args.precision or "auto", views=args.test_views,
                            device=args.device)
    clf = ZeroShotClassifier(model.model, classes=args.classes, prompts=args.prompts, transform=model.transform,
                             batch_size=args.batch_size, top_k=args.top_k,
                             progress=False if args.quiet else None)
    result = clf.predict(args.inputs, mpp=args.mpp)
    if args.json:
        print(json.dumps({**model.info(), **result.to_dict()}, indent=2))
    else:
        for name, (label, prob) in zip(result.names, result.top):
            print(f"{name}\t{label}\t{prob:.3f}")
    _print_notes(result.notes)
    return 0


def _eval_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    if data:
        p.add_argument("--data", required=True, help="folder with one sub-folder per class, or CSV path,label[,specimen]")
        p.add_argument("--split", help="keep only this split (CSV 'split' column, or DATA/<split>/)")
    p.add_argument("--model", default=DEFAULT_EVAL_MODEL,
                   help="model name/dir for load_model, or encoder:<encoder name> for a bare encoder")
    p.add_argument("--json", dest="json_out", metavar="OUT",
                   help="write metrics JSON here (Markdown and PNG beside it)")
    p.add_argument("--resize-mpp-factor", type=float, default=1.0,
                   help="robustness: rescale test images by this factor at fixed field size (1.5 = objects "
                   "1.5x larger, i.e. mpp / 1.5; 0.75 = smaller, reflect-padded)")
    p.add_argument("--stain-jitter", type=float, default=0.0, metavar="SIGMA",
                   help="robustness: HED stain jitter strength (e.g. 0.05), seeded per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    _add_precision(p)
    _add_device(p)
    _add_mpp(p, "the images whose CSV row gives none")
    _add_views(p)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: zeroshot, linear-probe, few-shot, vqa")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    zs = tasks.add_parser("zeroshot", help="zero-shot classification of a labelled image set")
    _eval_common(zs)
    zs.add_argument("--prompts", help="prompt file or packaged name; sub-folder names match its class "
                    "keys or synonyms")
    zs.add_argument("--classes", help="comma-separated class names (when no prompt file)")
    zs.add_argument("--all-classes", action="store_true",
                    help="let every prompt class compete, not only those present in the data")
    zs.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for 95%% CIs")
    zs.set_defaults(func=_cmd_eval_zeroshot)
    for name, help_text in (("linear-probe", "logistic regression on frozen image embeddings"),
                            ("few-shot", "k images per class, SimpleShot nearest centroid, several seeds")):
        lp = tasks.add_parser(name, help=help_text)
        _eval_common(lp, data=False)
        lp.add_argument("--train", required=True, help="training folder or CSV")
        lp.add_argument("--test", required=True, help="test folder or CSV")
        lp.add_argument("--train-split", help="CSV split for training rows (e.g. train)")
        lp.add_argument("--test-split", help="CSV split for test rows (e.g. val)")
        if name == "linear-probe":
            lp.add_argument("--C", dest="c", type=float, default=1.0, help="inverse regularisation strength")
        lp.add_argument("--n-boot", type=int, default=1000)
        if name == "few-shot":
            lp.add_argument("--k", type=int, required=True, help="training images per class")
            lp.add_argument("--n-seeds", type=int, default=5, help="few-shot draws averaged")
        lp.set_defaults(func=_cmd_eval_probe)
    vqa = tasks.add_parser("vqa", help="closed-form VQA (multiple choice in several orders, yes/no)")
    _eval_common(vqa)
    vqa.add_argument("--prompts", help="prompt file or packaged name: class display names come from its "
                     "first synonyms")
    vqa.add_argument("--n-orders", type=int, default=3, help="option orders per multiple-choice question")
    vqa.add_argument("--max-new-tokens", type=int, default=40)
    vqa.add_argument("--limit", type=int, help="only the first N images")
    vqa.add_argument("--llm-only", action="store_true",
                     help="every question to the LLM (default: as the chat answers, closed questions "
                          "about scored classes decided by the scores)")
    vqa.set_defaults(func=_cmd_eval_vqa)
    _add_eval_report(tasks)
    _add_eval_chat(tasks)


def _print_eval(result: dict) -> None:
    keys = ("balanced_accuracy", "weighted_f1", "accuracy", "ece", "option_order_consistency")
    ci = result.get("ci95", {})
    for key in keys:
        if key in result:
            interval = f"  (95% CI {ci[key][0]:.3f}-{ci[key][1]:.3f})" if key in ci else ""
            print(f"{key:26s} {result[key]:.3f}{interval}")
    print(f"{'n':26s} {result['n']}")
    for path in result.get("files", {}).values():
        print(f"wrote {path}")
    _print_notes(result.get("notes", []))


def _cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    from pathvlm.eval.common import load_eval_model
    from pathvlm.eval.zeroshot_eval import ZeroShotEvalConfig, run_zeroshot_eval

    cfg = ZeroShotEvalConfig(
        prompts=args.prompts, classes=[c.strip() for c in (args.classes or "").split(",") if c.strip()],
        all_classes=args.all_classes, split=args.split, batch_size=args.batch_size, n_boot=args.n_boot,
        seed=args.seed, resize_mpp_factor=args.resize_mpp_factor, stain_jitter=args.stain_jitter,
        mpp=args.mpp)
    model = load_eval_model(args.model, precision=args.precision or "auto", views=args.test_views,
                            device=args.device)
    _print_eval(run_zeroshot_eval(model, args.data, cfg, args.json_out))
    return 0


def _cmd_eval_probe(args: argparse.Namespace) -> int:
    from pathvlm.eval.common import load_eval_model
    from pathvlm.eval.linear_probe import LinearProbeConfig, run_linear_probe

    cfg = LinearProbeConfig(
        train=args.train, test=args.test, train_split=args.train_split, test_split=args.test_split,
        k=getattr(args, "k", None), n_seeds=getattr(args, "n_seeds", 1), c=getattr(args, "c", 1.0),
        batch_size=args.batch_size, n_boot=args.n_boot, seed=args.seed,
        resize_mpp_factor=args.resize_mpp_factor, stain_jitter=args.stain_jitter,
        mpp=args.mpp)
    model = load_eval_model(args.model, precision=args.precision or "auto", views=args.test_views,
                            device=args.device)
    _print_eval(run_linear_probe(model, cfg, args.json_out))
    return 0


def _cmd_eval_vqa(args: argparse.Namespace) -> int:
    from pathvlm.eval.common import load_eval_model
    from pathvlm.eval.vqa import VQAConfig, run_vqa_eval

    cfg = VQAConfig(prompts=args.prompts, split=args.split, n_orders=args.n_orders,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, limit=args.limit,
                    resize_mpp_factor=args.resize_mpp_factor, stain_jitter=args.stain_jitter,
                    mpp=args.mpp, route=not args.llm_only)
    model = load_eval_model(args.model, precision=args.precision or "auto", views=args.test_views,
                            device=args.device)
    _print_eval(run_vqa_eval(model.model, args.data, cfg, model.info(), args.json_out))
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a slide: dimensions, levels, mpp, objective, vendor")
    p.add_argument("slide", metavar="SLIDE", help="whole-slide image or plain image")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--slide-mpp", type=float, default=None, help="um/px of files that do not record it")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from pathvlm.slide import open_slide

    with open_slide(args.slide, mpp=args.slide_mpp) as slide:
        info = slide.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:18s} {value}")
    return 0


def _add_tile(sub: argparse._SubParsersAction) -> None:
    from pathvlm.slide import DEFAULT_MAX_PIXELS, TileConfig

    d = TileConfig()
    p = sub.add_parser("tile", help="find tissue and write <out>/<slide stem>.h5 tile coordinates + a PNG overlay")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mpp", type=float, default=d.mpp, help="tile resolution in um/px")
    p.add_argument("--size", type=int, default=d.size, help="tile size in pixels")
    p.add_argument("--slide-mpp", type=float, default=None, help="um/px of files that do not record it")
    p.add_argument("--stride", type=int, default=None, help="step between tiles in output px (default: size)")
    p.add_argument("--min-tissue", type=float, default=d.min_tissue, help="minimum tissue fraction of a kept tile")
    p.add_argument("--tissue", action="append", default=[], metavar="KEY=VALUE",
                   help="tissue detection setting, e.g. min_saturation=0.1 or thumbnail_size=1024 (repeatable)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="pixel budget for plain images")
    p.set_defaults(func=_cmd_tile)


def _cmd_tile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pathvlm.config import load_config
    from pathvlm.slide import TileConfig, TissueConfig, open_slide, save_tile_grid, tile_slide

    tissue_cfg = load_config(TissueConfig, None, args.tissue)
    tile_cfg = TileConfig(mpp=args.mpp, size=args.size, min_tissue=args.min_tissue, stride=args.stride)
    failed: list[str] = []
    done: dict[str, str] = {}  # output stem -> slide, so two slides never overwrite one file
    for path in args.slides:
        try:
            stem = Path(path).stem
            if stem in done:
                raise PathVLMError(f"{path}: same output name {stem}.h5 as {done[stem]}")
            with open_slide(path, mpp=args.slide_mpp, max_pixels=args.max_pixels) as slide:
                grid = tile_slide(slide, tile_cfg, tissue_cfg)
                h5_path, _png = save_tile_grid(grid, slide, args.out, tissue_cfg)
            done[stem] = path
            print(f"{path}: {len(grid)} tiles ({grid.size} px at {grid.mpp:g} um/px, level {grid.level}) -> {h5_path}")
        except PathVLMError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed.append(str(exc))
    print(f"tiled {len(args.slides) - len(failed)} of {len(args.slides)} slides, {len(failed)} failed")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT if failed else 0


# every sub-command's parser builder, in the order `pathvlm --help` shows them
def _add_ask(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask the chat model a question about a slide, image or case")
    p.add_argument("input", help="slide, image, .h5 feature file, or case file (.yaml/.json)")
    p.add_argument("question")
    p.add_argument("--model", default="demo", help="run directory or registered model name")
    p.add_argument("--features", help="cached .h5 features of INPUT (skips encoding the slide)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    _add_precision(p)
    _add_device(p)
    _add_mpp(p, "an image INPUT")
    p.set_defaults(func=_cmd_ask)


def _cmd_ask(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pathvlm.model import load_model

    model = load_model(args.model, precision=args.precision or "auto", device=args.device)
    source = args.input
    if args.features:
        from pathvlm.features import load_features
        from pathvlm.model.inputs import SlideInput

        bag = load_features(args.features)
        source = SlideInput(bag, Path(args.input).stem, bag.attrs.get("stain"), None, args.features)
    gen = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    for piece in model.stream(source, args.question, mpp=args.mpp, **gen):
        print(piece, end="", flush=True)
    print()
    _print_notes(model.last_notes)
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    from pathvlm.reports import list_formats, list_report_types

    p = sub.add_parser("report", help="draft structured reports (DRAFTS, for pathologist review)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="slides, images, .h5 feature files or case files (.yaml/.json); many "
                   "inputs share one model load")
    p.add_argument("--type", dest="kind", required=True, choices=list_report_types())
    p.add_argument("--clinical", help="YAML/JSON file: field name -> value entered by the pathologist")
    p.add_argument("--format", dest="fmt", default="json", choices=list_formats())
    p.add_argument("--model", default="demo", help="run directory or registered model name")
    p.add_argument("--out", help="file (one input) or folder (one <input stem> file each); "
                   "default: print")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="fill an image-decided field only at this calibrated probability or "
                   "above (default: the threshold chosen on val, in the model's calibration.json)")
    p.add_argument("--narrative-tokens", type=int, default=0,
                   help="let the LLM write the narrative in up to N tokens; it is used only if "
                   "every entity, value and number it names is in the report (default 0: template)")
    p.add_argument("--llm-fields", action="store_true",
                   help="list the LLM's (uncalibrated) ranking for fields no calibrated score "
                   "decides; they still abstain (slower: one LLM pass per field)")
    _add_precision(p)
    _add_device(p)
    _add_mpp(p, "image INPUTs (a case entry's own mpp wins)")
    p.set_defaults(func=_cmd_report)


def _load_clinical(path: str) -> dict:
    import json
    from pathlib import Path

    import yaml

    from pathvlm.errors import ConfigError

    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read clinical file ({exc.strerror or exc})") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: invalid clinical file ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: clinical file must map field names to values")
    return data


_SUFFIX = {"json": ".json", "md": ".md", "fhir": ".fhir.json"}


def _write_atomic(path, text: str) -> None:
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _report_targets(args: argparse.Namespace) -> list:
    """Output path per input (None: print); a folder unless one input goes to a named file."""
    from pathlib import Path

    if not args.out:
        return [None] * len(args.inputs)
    out = Path(args.out)
    if len(args.inputs) == 1 and not out.is_dir() and out.suffix:
        return [out]
    names: dict[str, int] = {}
    targets = []
    for item in args.inputs:
        stem = Path(item).name.split(".")[0] or "report"
        names[stem] = names.get(stem, 0) + 1
        stem = stem if names[stem] == 1 else f"{stem}_{names[stem]}"
        targets.append(out / f"{stem}{_SUFFIX[args.fmt]}")
    return targets


def _cmd_report(args: argparse.Namespace) -> int:
    from pathvlm.errors import ConfigError
    from pathvlm.model import load_model
    from pathvlm.reports import ImageFindings, draft_report, render_report
    from pathvlm.reports.from_model import FindingsConfig, ReportDrafter

    clinical = _load_clinical(args.clinical) if args.clinical else None
    draft_report(ImageFindings(), args.kind, clinical)  # bad clinical input fails before loading
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    targets = _report_targets(args)
    model = load_model(args.model, precision=args.precision or "auto", device=args.device)
    drafter = ReportDrafter(model, FindingsConfig(
        narrative_tokens=max(0, args.narrative_tokens), llm_fields=args.llm_fields))
    failed = []
    for item, target in zip(args.inputs, targets):
        try:
            report = drafter.draft(item, args.kind, clinical, min_confidence=args.min_confidence,
                                   mpp=args.mpp)
            text = render_report(report, args.fmt)
            _print_notes(drafter.model.last_notes)
        except (PathVLMError, OSError, ValueError) as exc:  # one line, the other inputs go on
            msg = str(exc) if item in str(exc) else f"{item}: {exc}"
            print(f"error: {' '.join(msg.split())}", file=sys.stderr)
            failed.append(item)
            continue
        if target is None:
            print(text)
        else:
            _write_atomic(target, text)
            print(f"wrote {target}")
    if failed and len(args.inputs) > 1:
        print(f"{len(failed)} of {len(args.inputs)} input(s) failed: {', '.join(failed)}",
              file=sys.stderr)
    return EXIT_BAD_INPUT if failed else 0


def _add_eval_report(tasks: argparse._SubParsersAction) -> None:
    from pathvlm.reports import list_report_types

    p = tasks.add_parser("report", help="drafted reports vs labels: top entity, fields, abstention")
    p.add_argument("--type", dest="kind", default="lymphoma", choices=list_report_types())
    p.add_argument("--data", required=True, help="folder with one sub-folder per class, or CSV; "
                   "or the data root (../shared/data): every image-decided field val can label, "
                   "measured at the threshold (coverage, selective accuracy, ECE)")
    p.add_argument("--split", help="keep only this split (CSV 'split' column, or DATA/<split>/)")
    p.add_argument("--model", default="demo", help="run directory or registered model name")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write metrics JSON (+ Markdown)")
    p.add_argument("--limit", type=int, help="only the first N images (per val set)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="threshold to measure at (default: the one in the model's calibration)")
    _add_precision(p)
    _add_device(p)
    _add_mpp(p, "the images whose CSV row gives none")
    p.set_defaults(func=_cmd_eval_report)


def _cmd_eval_report_fields(args: argparse.Namespace) -> int:
    from pathvlm.eval.report import write_report
    from pathvlm.eval.report_fields import markdown_table, run_field_suite
    from pathvlm.model import load_model
    from pathvlm.provenance import model_weights_hash

    model = load_model(args.model, precision=args.precision or "auto", device=args.device)
    result = run_field_suite(model, args.data, args.limit, args.min_confidence, progress=not args.quiet)
    result["model"] = args.model
    result["weights_hash"] = model_weights_hash(model)  # which weights these numbers belong to
    table = markdown_table(result)
    print(table, end="")
    if args.json_out:
        paths = write_report(result, args.json_out)
        with paths["markdown"].open("a") as f:
            f.write("\n" + table)
        print(f"wrote {paths['json']}\nwrote {paths['markdown']}")
    return 0


def _cmd_eval_report(args: argparse.Namespace) -> int:
    from pathvlm.eval.report_eval import ReportEvalConfig, run_report_eval
    from pathvlm.eval.report_fields import is_suite_root
    from pathvlm.model import load_model

    if is_suite_root(args.data):
        return _cmd_eval_report_fields(args)
    cfg = ReportEvalConfig(kind=args.kind, split=args.split, limit=args.limit, mpp=args.mpp)
    model = load_model(args.model, precision=args.precision or "auto", device=args.device)
    result = run_report_eval(model, args.data, cfg, args.json_out, args.model)
    print(f"{'top_entity_accuracy':32s} {result['top_entity_accuracy']:.3f}")
    for name, acc in result["field_accuracy"].items():
        print(f"{'field ' + name:32s} {acc:.3f}")
    print(f"{'ancillary_wrongly_filled_share':32s} {result['ancillary_wrongly_filled_share']:.3f}")
    print(f"{'n':32s} {result['n']}")
    for path in result.get("files", {}).values():
        print(f"wrote {path}")
    _print_notes(result.get("notes", []))
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit the calibration of a model's image-decided report "
                       "fields on the val split; writes calibration.json beside its weights")
    p.add_argument("--model", default="demo", help="run directory or registered model name")
    p.add_argument("--data", help="data root with lymphoma_nia/, crc_tiles/, pcam/ (default: "
                   "$PATHVLM_DATA or ../shared/data beside the checkout)")
    p.add_argument("--out", help="calibration file to write (default: <model dir>/calibration.json)")
    p.add_argument("--target-precision", type=float, default=0.9,
                   help="selective precision the report threshold is chosen for")
    p.add_argument("--heads", help="comma-separated heads (default: all; pathvlm list heads)")
    p.add_argument("--limit", type=int, help="only N val images per data set (quick check)")
    _add_device(p)
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pathvlm.calibration import FILE_NAME
    from pathvlm.errors import ConfigError
    from pathvlm.eval.calibrate import fit_calibration, markdown_table
    from pathvlm.model import load_model
    from pathvlm.resources import data_dir

    if not 0.0 < args.target_precision <= 1.0:
        raise ConfigError(f"--target-precision must be in (0, 1], got {args.target_precision}")
    model = load_model(args.model, device=args.device)
    out = Path(args.out) if args.out else (Path(model.run_dir) / FILE_NAME if model.run_dir
                                           else None)
    if out is None:
        raise ConfigError("pass --out: this model has no run directory")
    heads = [h.strip() for h in args.heads.split(",")] if args.heads else None
    data = args.data or data_dir()
    if data is None:
        raise ConfigError("no data: pass --data or set PATHVLM_DATA")
    cal = fit_calibration(model, data, heads, args.target_precision, args.limit,
                          progress=not args.quiet)
    cal.save(out)
    print(markdown_table(cal), end="")
    print(f"wrote {out} ({cal.meta['seconds']:.0f} s)")
    return 0


def _add_eval_chat(tasks: argparse._SubParsersAction) -> None:
    p = tasks.add_parser("chat", help="chat questions of every type, checked per type (facts, refusals, next steps, ...)")
    p.add_argument("--data", required=True, action="append",
                   help="instruction JSONL built by `pathvlm data build` (val split); repeat for several")
    p.add_argument("--model", default="demo", help="run directory or registered model name")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write metrics JSON (+ Markdown, answers)")
    p.add_argument("--per-type", type=int, default=30, help="questions per type and data file (0: all)")
    p.add_argument("--cases", help="packaged example cases, comma separated (default: all that load)")
    p.add_argument("--consistency-limit", type=int, help="only the first N images in the top-entity comparison")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    _add_device(p)
    p.set_defaults(func=_cmd_eval_chat)


def _cmd_eval_chat(args: argparse.Namespace) -> int:
    from pathvlm.eval.chat_eval import ChatEvalConfig, run_chat_eval
    from pathvlm.model import load_model

    cfg = ChatEvalConfig(per_type=args.per_type, max_new_tokens=args.max_new_tokens, seed=args.seed,
                         consistency_limit=args.consistency_limit,
                         cases=tuple(c for c in args.cases.split(",") if c) if args.cases else None)
    result = run_chat_eval(load_model(args.model, device=args.device), args.data, cfg, {"model": args.model},
                           args.json_out)
    for name, e in result["per_type"].items():
        print(f"{name:14s} {e['accuracy']:.3f}  (95% CI {e['ci95'][0]:.3f}-{e['ci95'][1]:.3f}, n={e['n']})")
    a = result["top_entity_agreement"]
    print(f"{'top entity == report':14s} {a['agree']}/{a['n']}")
    for path in result.get("files", {}).values():
        print(f"wrote {path}")
    return 0


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_list,
    _add_schema,
    _add_info,
    _add_tile,
    _add_embed,
    _add_train,
    _add_data,
    _add_zeroshot,
    _add_eval,
    _add_ask,
    _add_report,
    _add_calibrate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathvlm", description="pathvlm: slides in, features, zero-shot classification, chat and draft "
                                     "reports (drafts for a pathologist's review).")
    parser.add_argument("--version", action="version", version=f"pathvlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="hide progress bars and info")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


# environment that keeps transformers and huggingface_hub quiet when they are imported later
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextmanager
def _quiet_libraries(verbose: bool) -> Iterator[None]:
    """While one command runs: no library FutureWarnings, no transformers weight-loading report
    table or progress bars (unless ``-v``). Everything is restored afterwards, so calling `main`
    in-process leaves no global filters behind."""
    if verbose:
        yield
        return
    saved_env = {key: os.environ.get(key) for key in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)  # read by transformers / huggingface_hub when first imported
    tf_logging = sys.modules.get("transformers.utils.logging")
    before = (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()) if tf_logging else None
    if tf_logging is not None:  # imported already: the environment is read, use its switches
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tf_logging = sys.modules.get("transformers.utils.logging")
        if tf_logging is not None and before is not None:
            tf_logging.set_verbosity(before[0])
            (tf_logging.enable_progress_bar if before[1] else tf_logging.disable_progress_bar)()
        elif tf_logging is not None:  # imported during the command: back to what the environment says
            # (its progress bars stay off: huggingface_hub fixed that switch when it was imported)
            level = os.environ.get("TRANSFORMERS_VERBOSITY", "warning")
            tf_logging.set_verbosity(tf_logging.log_levels.get(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # bitsandbytes' CPU backend warns on import about an optional hub package
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        with _quiet_libraries(args.verbose):
            return int(args.func(args) or 0)
    except PathVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
