"""Fine-tune a trained pathvlm model on your instruction JSONL with LoRA; score before and after.

    python scripts/finetune_lora.py --model runs/instruct_demo --data my_chats.jsonl \
        --val-fraction 0.2 --out runs/my_finetune [--merge] [--steps 200] [key=value ...]

The data format is data/README.md section 2. The held-out split is --val FILE or a fraction of
--data drawn by specimen (or input file). Extra ``key=value`` words override the `instruct` stage
config (e.g. ``lora.r=8 data.max_length=256``); `pathvlm train instruct init=MODEL ...` trains the
same way without the before/after report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="trained pathvlm run directory or registered name (demo)")
    p.add_argument("--data", required=True, help="instruction conversations JSONL")
    p.add_argument("--val", default="", help="held-out conversations JSONL (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("-c", "--config", help="instruct stage YAML to start from (default: built-in defaults)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated LLM module names that get LoRA")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--merge", action="store_true", help="also save <out>/merged with the adapter merged in")
    p.add_argument("--qlora", action="store_true", help="load the LLM in 4 bit (bitsandbytes: CUDA, or CPU with bitsandbytes >= 0.50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the instruct stage config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pathvlm.errors import PathVLMError
    from pathvlm.train import load_stage_config
    from pathvlm.train.finetune import finetune_lora

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    overrides = [
        f"init={args.model}", f"data.train={args.data}", f"data.val={args.val}",
        f"data.val_fraction={args.val_fraction}", f"train.out_dir={args.out}", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"optim.lr={args.lr}", f"lora.r={args.lora_r}",
        f"lora.alpha={2 * args.lora_r}", f"lora.target_modules=[{args.target_modules}]",
        f"data.max_length={args.max_length}", f"qlora={str(args.qlora).lower()}", f"train.seed={args.seed}",
        *args.overrides,
    ]
    try:
        cfg = load_stage_config("instruct", args.config, overrides)
        report = finetune_lora(cfg, merge=args.merge)
    except PathVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
