"""Chat speed on CPU with SmolLM2-135M: model load, time to first token, decode rate vs plain
generate (fp32, bf16 autocast and ``auto`` precision side by side), aggregator scaling (1k-100k
patches) and multi-slide cases.

    .venv/bin/python benchmarks/bench_chat.py [--quick] [--precision-only]

Memory: each aggregator size and each case runs in a fresh subprocess; the figure is the peak
resident set size during the step (kernel high-water mark, reset just before) minus the RSS at
its start (Linux only).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import torch


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


class PeakRSS:
    """Peak RSS above the current RSS inside a ``with`` block: resets the kernel's high-water
    mark (``clear_refs`` 5) on entry and reads ``VmHWM`` on exit (Linux)."""

    def __enter__(self) -> Self:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.mib = _status_mib("VmHWM") - self.start


def in_child(*argv: str) -> list[float]:
    """Run one measurement in a fresh interpreter; it prints its numbers on the last line."""
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
                         check=True)
    return [float(v) for v in out.stdout.strip().splitlines()[-1].split()]


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_load() -> tuple:
    from pathvlm.model import load_llm

    with tempfile.TemporaryDirectory() as cache:
        os.environ["PATHVLM_CACHE"] = cache
        cold = timed(load_llm)
        warm = timed(load_llm)
    os.environ.pop("PATHVLM_CACHE")
    return cold, warm


def bench_decode(model, feats, n_new: int,
                 which: tuple[str, ...] = ("pathvlm", "pathvlm ask (routed)", "plain")) -> dict:
    """TTFT and decode tok/s, PathVLM (slide via inputs_embeds) vs plain generate, same length."""
    llm, tok = model.llm, model.tokenizer
    q = "Describe the main findings on this slide."
    embeds = model.prepare(feats, q)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], return_tensors="pt",
                                              return_dict=True)["input_ids"]
    plain_ids = torch.full((1, embeds.shape[1]), int(tok.encode(" tissue")[0]))
    plain_ids[0, : ids.shape[1]] = ids[0]
    gen = {"do_sample": False, "pad_token_id": tok.pad_token_id}

    def vlm(n):
        return lambda: model.generate_ids(feats, q, max_new_tokens=n, min_new_tokens=n)

    def asked(n):  # the shipped chat path: routed first (a describe question goes to the LLM)
        return lambda: model.ask(feats, q, max_new_tokens=n, min_new_tokens=n)

    def plain(n):
        return lambda: llm.generate(plain_ids, attention_mask=torch.ones_like(plain_ids),
                                    max_new_tokens=n, min_new_tokens=n, **gen)

    out = {"prompt_len": embeds.shape[1]}
    for name, f in (("pathvlm", vlm), ("pathvlm ask (routed)", asked), ("plain", plain)):
        if name not in which:
            continue
        t1, tn = timed(f(1), 3), timed(f(n_new), 2)
        out[name] = (t1, (n_new - 1) / (tn - t1))
    out["ids"] = model.generate_ids(feats, q, max_new_tokens=n_new)[0].tolist()  # greedy answer
    return out


def bench_precisions(model, feats, n_new: int) -> None:
    """Decode and TTFT in fp32, under bf16 autocast (fp32 weights), and at ``auto`` (weights cast by
    `PathVLM.set_precision`), each for PathVLM and for plain generate of the same LLM."""
    from pathvlm.precision import autocast, resolve_precision

    auto = resolve_precision("auto", "cpu")
    rows = {}
    model.set_precision("fp32")
    rows["fp32"] = bench_decode(model, feats, n_new, ("pathvlm", "plain"))
    with autocast("bf16", "cpu"):
        rows["bf16 autocast, fp32 weights"] = bench_decode(model, feats, n_new, ("pathvlm", "plain"))
    model.set_precision("auto")
    rows[f"auto ({auto}, weights cast)"] = bench_decode(model, feats, n_new, ("pathvlm", "plain"))
    model.set_precision("fp32")
    print(f"\n## Precision: decode, prompt {rows['fp32']['prompt_len']} tokens, {n_new} new tokens, greedy\n"
          "| precision | PathVLM TTFT | PathVLM decode tok/s | plain generate TTFT | plain decode tok/s | "
          "PathVLM decode / fp32 plain decode | greedy ids vs fp32 |\n|---|---|---|---|---|---|---|")
    base, ref_ids = rows["fp32"]["plain"][1], rows["fp32"]["ids"]
    for name, d in rows.items():
        ids = d["ids"]
        first = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), None)
        same = "identical" if ids == ref_ids else f"first differs at token {first if first is not None else min(len(ids), len(ref_ids))}"
        print(f"| {name} | {d['pathvlm'][0] * 1000:.0f} ms | {d['pathvlm'][1]:.1f} | {d['plain'][0] * 1000:.0f} ms | "
              f"{d['plain'][1]:.1f} | {d['pathvlm'][1] / base:.2f}x | {same} |")


def child_aggregator(name: str, n: int, dim: int) -> None:
    from pathvlm.model import create_aggregator

    agg = create_aggregator(name, in_dim=dim, hidden_dim=256, n_tokens=8).eval()
    x = torch.randn(1, n, dim)
    with torch.no_grad(), PeakRSS() as mem:
        t = timed(lambda: agg(x, None))
    print(t, mem.mib)


def child_case(n_slides: int, dim: int, n_patches: int) -> None:
    from pathvlm.features import FeatureBag
    from pathvlm.model import ModelConfig, build_model
    from pathvlm.model.inputs import SlideInput

    model = build_model(ModelConfig(feature_dim=dim, n_tokens=8, hidden_dim=256, max_case_tokens=64))
    slides = [SlideInput(FeatureBag(torch.randn(n_patches, dim), torch.zeros(n_patches, 2, dtype=torch.int64)),
                         f"S{i}", "H&E" if i == 0 else "IHC: CD20", None) for i in range(n_slides)]
    with torch.no_grad(), PeakRSS() as m1:
        t_tok = timed(lambda: model.slide_embeddings(slides))
    with PeakRSS() as m2:
        t_ans = timed(lambda: model.generate_ids(slides, "Summarise the case.", max_new_tokens=16,
                                                min_new_tokens=16))
    print(model.tokens_per_slide(n_slides), t_tok, m1.mib, t_ans, m2.mib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--dim", type=int, default=512, help="patch feature width")
    ap.add_argument("--precision-only", action="store_true", help="only the fp32 / autocast / auto table")
    ap.add_argument("--rounds", type=int, default=0,
                    help="with --precision-only: after the table, N rounds alternating fp32 plain "
                         "generate and PathVLM auto, and the median of their per-round decode ratios")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "agg":
            return child_aggregator(rest[0], int(rest[1]), args.dim)
        return child_case(int(rest[0]), args.dim, 2000)
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, cpu: {os.cpu_count()}")
    if args.precision_only:
        return main_precision(args)
    if args.rounds:
        ap.error("--rounds needs --precision-only")
    cold, warm = bench_load()
    print(f"\n## LLM load (SmolLM2-135M GGUF)\n| cold (dequantise + cache) | warm (cache) |\n|---|---|\n"
          f"| {cold:.1f} s | {warm:.1f} s |")

    from pathvlm.features import FeatureBag, load_features, write_features
    from pathvlm.model import ModelConfig, build_model

    model = build_model(ModelConfig(feature_dim=args.dim, n_tokens=8, hidden_dim=256, max_case_tokens=64))
    with tempfile.TemporaryDirectory() as tmp:  # "cached features": a real .h5 read back
        n = 2000
        path = write_features(Path(tmp) / "slide.h5", torch.randn(n, args.dim), torch.zeros(n, 2, dtype=torch.int64), {})
        feats = load_features(path)
    assert isinstance(feats, FeatureBag)
    n_new = 16 if args.quick else 48
    d = bench_decode(model, feats, n_new)
    print(f"\n## Decode, prompt {d['prompt_len']} tokens (8 slide tokens), {n_new} new tokens, greedy\n"
          "| | time to first token | decode tok/s |\n|---|---|---|")
    for name in ("pathvlm", "pathvlm ask (routed)", "plain"):
        print(f"| {name} | {d[name][0] * 1000:.0f} ms | {d[name][1]:.1f} |")
    print(f"decode ratio pathvlm/plain: {d['pathvlm'][1] / d['plain'][1]:.2f}, "
          f"routed ask/plain: {d['pathvlm ask (routed)'][1] / d['plain'][1]:.2f}")
    bench_precisions(model, feats, n_new)

    sizes = (1000, 10000) if args.quick else (1000, 10000, 100000)
    print(f"\n## Aggregator (K=8, hidden 256, D={args.dim}), one bag, no grad\n"
          "| aggregator | patches | time | peak extra RSS | (input size) |\n|---|---|---|---|---|")
    for name, n in [(a, n) for a in ("abmil", "resampler") for n in sizes]:
        t, mib = in_child("agg", name, str(n), "--dim", str(args.dim))
        inp = n * args.dim * 4 / 2**20
        print(f"| {name} | {n} | {t * 1000:.0f} ms | {mib:.0f} MiB | {inp:.0f} MiB |")

    print("\n## Case (2000 patches a slide, budget 64 tokens): slide tokens, then one 16-token answer\n"
          "| slides | tokens/slide | slide tokens time | peak extra RSS | answer time | peak extra RSS |\n"
          "|---|---|---|---|---|---|")
    for s in (1, 4, 16):
        k, t1, m1, t2, m2 = in_child("case", str(s), "--dim", str(args.dim))
        print(f"| {s} | {int(k)} | {t1 * 1000:.0f} ms | {m1:.0f} MiB | {t2:.2f} s | {m2:.0f} MiB |")
    print(f"\nmain process max RSS: {maxrss_mib():.0f} MiB")


def main_precision(args: argparse.Namespace) -> None:
    from pathvlm.features import load_features, write_features
    from pathvlm.model import ModelConfig, build_model

    model = build_model(ModelConfig(feature_dim=args.dim, n_tokens=8, hidden_dim=256, max_case_tokens=64))
    with tempfile.TemporaryDirectory() as tmp:
        n = 2000
        path = write_features(Path(tmp) / "slide.h5", torch.randn(n, args.dim), torch.zeros(n, 2, dtype=torch.int64), {})
        feats = load_features(path)
    n_new = 16 if args.quick else 48
    bench_precisions(model, feats, n_new)
    if args.rounds > 0:
        bench_rounds(model, feats, n_new, args.rounds)


def bench_rounds(model, feats, n_new: int, rounds: int) -> None:
    """Alternate fp32 plain generate and PathVLM in ``auto`` ``rounds`` times: a shared box drifts
    between one run and the next, so the ratio of neighbouring runs is steadier than one table."""
    import statistics

    ratios, plain, vlm = [], [], []
    for _ in range(rounds):
        model.set_precision("fp32")
        plain.append(bench_decode(model, feats, n_new, ("plain",))["plain"][1])
        model.set_precision("auto")
        vlm.append(bench_decode(model, feats, n_new, ("pathvlm",))["pathvlm"][1])
        ratios.append(vlm[-1] / plain[-1])
    model.set_precision("fp32")
    print(f"\n## {rounds} alternating rounds: fp32 plain generate vs PathVLM auto, decode tok/s\n"
          "| round | fp32 plain | PathVLM auto | ratio |\n|---|---|---|---|")
    for i, (a, b, r) in enumerate(zip(plain, vlm, ratios), 1):
        print(f"| {i} | {a:.1f} | {b:.1f} | {r:.2f}x |")
    print(f"median ratio {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
