"""Two (or more) PathVLM models that differ in their LLM, side by side: load time, decode speed and
the chat eval. Each model is loaded and timed in a fresh process.

    DATA=../shared/data python scripts/llm_compare.py --model demo --model runs/gemma_model \
        --chat runs/llm_compare/smollm2/chat.json --chat runs/llm_compare/gemma/chat.json

``--chat`` names the ``pathvlm eval chat --json`` output of each model (same order as ``--model``);
run the eval with the same arguments for every model. Decode: the routed chat path is bypassed
(`PathVLM.generate_ids`, the LLM answering a describe question about a val tile), 48 new tokens,
greedy, best of 2, in fp32 and in ``auto``; load: ``load_model`` wall time with the LLM's
dequantised GGUF cache warm (the first, cold load is reported by the training log).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathvlm.model import load_model
model_dir, image, n_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter(); model = load_model(model_dir, device="cpu"); load_s = time.perf_counter() - t
q = "Describe the morphology in this image."
out = {"load_s": load_s, "llm": str(model.cfg.llm),
       "llm_params_m": sum(p.numel() for p in model.llm.parameters()) / 1e6}
for precision in ("fp32", "auto"):
    model.set_precision(precision)
    model.generate_ids(image, q, max_new_tokens=2, min_new_tokens=2)  # warm-up
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        ids = model.generate_ids(image, q, max_new_tokens=n_new, min_new_tokens=n_new)
        best = min(best, time.perf_counter() - t)
    out[f"tok_s_{precision}"] = ids.shape[1] / best
print(json.dumps(out))
"""


def measure(model: str, image: Path, n_new: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, model, str(image), str(n_new)], capture_output=True,
                          text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{model}: measurement failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="model name or directory (repeat)")
    ap.add_argument("--chat", action="append", default=[], help="its `pathvlm eval chat --json` file (repeat)")
    ap.add_argument("--image", type=Path, help="tile to ask about (default: a CRC val tile from $DATA)")
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    if args.chat and len(args.chat) != len(args.model):
        raise SystemExit("give one --chat file per --model")
    image = args.image
    if image is None:
        from pathvlm.data.builders import read_index

        root = Path(os.environ.get("PATHVLM_DATA") or os.environ.get("DATA") or "../shared/data") / "crc_tiles"
        image = Path(next(r.image for r in read_index(root / "index.csv") if r.split == "val"))
    rows = [measure(m, image, args.new_tokens) for m in args.model]
    chats = [json.loads(Path(c).read_text()) for c in args.chat]
    types = sorted({t for c in chats for t in c["per_type"]})
    print(f"| | {' | '.join(args.model)} |\n|---|" + "---|" * len(args.model))
    print("| LLM | " + " | ".join(f"{r['llm']} ({r['llm_params_m']:.0f} M)" for r in rows) + " |")
    print("| load_model, warm cache, s | " + " | ".join(f"{r['load_s']:.1f}" for r in rows) + " |")
    for p in ("fp32", "auto"):
        print(f"| decode tok/s, {p} | " + " | ".join(f"{r[f'tok_s_{p}']:.1f}" for r in rows) + " |")
    for t in types:
        cells = []
        for c in chats:
            e = c["per_type"].get(t)
            cells.append(f"{e['accuracy']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] (n={e['n']})" if e else "-")
        print(f"| chat {t} | " + " | ".join(cells) + " |")
    if chats:
        print("| chat top entity == report | " + " | ".join(
            f"{c['top_entity_agreement']['agree']}/{c['top_entity_agreement']['n']}" for c in chats) + " |")


if __name__ == "__main__":
    main()
