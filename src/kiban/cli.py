"""The ``kiban`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kiban.config import ConfigError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiban", description="The kiban service toolkit.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="serve a kiban service: kiban run module:app")
    run_parser.add_argument("target", help="module:attribute of the FastAPI app or kiban.Service")
    args = parser.parse_args(argv)
    if args.command == "run":
        from kiban.server import run

        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as ``python -m`` would: the app is local code
        try:
            run(args.target)
        except ConfigError as exc:
            print(f"kiban: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
