"""The ``pathvlm`` command line. The only module that sees argparse; it calls library functions.

Each sub-command is one ``_add_<name>(sub)`` function that builds its parser and sets
``func`` to a handler taking the parsed namespace. Handlers print; the library logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pathvlm import __version__
from pathvlm.errors import PathVLMError

EXIT_BAD_INPUT = 2


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered components")
    p.add_argument("what", choices=sorted(_LISTERS), help="which registry to list")
    p.set_defaults(func=_cmd_list)


def _list_encoders() -> list[str]:
    from pathvlm.encoders import list_encoders

    rows = []
    for entry in list_encoders(details=True):
        gated = "gated" if entry.gated else "open"
        rows.append(f"{entry.name:32s} {entry.license:28s} {gated:6s} {entry.description}")
    return rows


# registry name -> function returning printable rows; other registries add themselves here
_LISTERS: dict[str, Callable[[], list[str]]] = {
    "encoders": _list_encoders,
}


def _cmd_list(args: argparse.Namespace) -> int:
    for row in _LISTERS[args.what]():
        print(row)
    return 0


# every sub-command's parser builder, in the order `pathvlm --help` shows them
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_list,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathvlm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pathvlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="hide progress bars and info")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except PathVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
