"""Start the pathvlm app: ``python app.py [--host 127.0.0.1] [--port 7860] [--model demo]``.

Server paths open only under ``--slide-root`` folders (and ``PATHVLM_SLIDE_ROOTS``); without one,
only uploads and the listed examples. Every limit has a flag and a ``PATHVLM_*`` variable.
"""

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pathvlm.errors import PathVLMError


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=_env("PATHVLM_MODEL", "demo"),
                   help="model name or run directory (default: $PATHVLM_MODEL or demo)")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                   help="a login (repeatable); each login sees only its own slides, chats and reports")
    p.add_argument("--auth-file", default=os.environ.get("PATHVLM_AUTH_FILE"),
                   help="file of user:password lines (keeps passwords out of the process list)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--slide-root", action="append", default=[], metavar="DIR",
                   help="folder whose slides may be opened by server path (repeatable; also "
                        "$PATHVLM_SLIDE_ROOTS, os.pathsep-separated); default: none, the path box is hidden")
    p.add_argument("--max-file-size", default=_env("PATHVLM_MAX_FILE_SIZE", "2gb"),
                   help="upload limit, e.g. 500mb ($PATHVLM_MAX_FILE_SIZE; default 2gb)")
    p.add_argument("--max-pixels", type=int, default=_env("PATHVLM_MAX_PIXELS", "100000000"),
                   help="pixel budget of one image, or of one slide at the embedding resolution "
                        "($PATHVLM_MAX_PIXELS; default 100000000)")
    p.add_argument("--max-session-slides", type=int, default=_env("PATHVLM_MAX_SESSION_SLIDES", "12"),
                   help="slides one session's case may hold ($PATHVLM_MAX_SESSION_SLIDES; default 12)")
    p.add_argument("--max-session-feature-mb", type=float,
                   default=_env("PATHVLM_MAX_SESSION_FEATURE_MB", "512"),
                   help="cached features one session may pin, MB ($PATHVLM_MAX_SESSION_FEATURE_MB; default 512)")
    p.add_argument("--max-cache-mb", type=float, default=_env("PATHVLM_MAX_CACHE_MB", "2048"),
                   help="all prepared slides kept in memory, MB, least recently used dropped first "
                        "($PATHVLM_MAX_CACHE_MB; default 2048)")
    p.add_argument("--audit-log", default=os.environ.get("PATHVLM_AUDIT_LOG"), metavar="FILE",
                   help="append one JSON line per open / ask / report (UTC time, user, slide "
                        "fingerprint, model, weights hash); no question text")
    p.add_argument("--audit-log-text", action="store_true", help="also record question text in the audit log")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   default=os.environ.get("PATHVLM_PRECISION", "auto"),
                   help="encoder and LLM precision (default: $PATHVLM_PRECISION or auto: bf16 where "
                   "the hardware runs it fast, else fp16 on CUDA, else fp32)")
    p.add_argument("--device", default=os.environ.get("PATHVLM_DEVICE"),
                   help="cpu, cuda, cuda:1 (default: $PATHVLM_DEVICE, else CUDA when available)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from pathlib import Path

        from pathvlm.model import load_model
        from pathvlm.ui import build_demo, launch_demo
        from pathvlm.ui.audit import AuditLog, model_weights_hash
        from pathvlm.ui.deploy import DeployConfig, roots_from_env

        deploy = DeployConfig(
            slide_roots=tuple(Path(r) for r in args.slide_root) + tuple(roots_from_env()),
            max_file_size=args.max_file_size, max_pixels=args.max_pixels,
            max_session_slides=args.max_session_slides, max_session_feature_mb=args.max_session_feature_mb,
            max_cache_mb=args.max_cache_mb, audit_log=Path(args.audit_log) if args.audit_log else None,
            audit_text=args.audit_log_text)
        model = load_model(args.model, precision=args.precision, device=args.device)
        audit = None
        if deploy.audit_log is not None:
            audit = AuditLog(deploy.audit_log, args.model, model_weights_hash(model), args.audit_log_text)
        demo = build_demo(model, max_new_tokens=args.max_new_tokens, deploy=deploy, audit=audit)
        launch_demo(demo, args.host, args.port, args.auth, args.share, auth_file=args.auth_file)
    except PathVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
