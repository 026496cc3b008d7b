"""Start the pathvlm app: ``python app.py [--host 127.0.0.1] [--port 7860] [--model demo]``."""

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pathvlm.errors import PathVLMError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=os.environ.get("PATHVLM_MODEL", "demo"),
                   help="model name or run directory (default: $PATHVLM_MODEL or demo)")
    p.add_argument("--auth", default=None, help="user:password required to open the app")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--max-file-size", default="2gb", help="upload limit, e.g. 500mb")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   default=os.environ.get("PATHVLM_PRECISION", "auto"),
                   help="encoder and LLM precision (default: $PATHVLM_PRECISION or auto: bf16 where "
                   "the hardware runs it fast, else fp16 on CUDA, else fp32)")
    args = p.parse_args(argv)
    try:
        from pathvlm.model import load_model
        from pathvlm.ui import build_demo, launch_demo

        demo = build_demo(load_model(args.model, precision=args.precision), max_new_tokens=args.max_new_tokens)
        launch_demo(demo, args.host, args.port, args.auth, args.share, args.max_file_size)
    except PathVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
