"""The ``robopol-clean`` command line: thin wrappers around the library API.

Each subcommand is registered by an ``_add_<name>(subparsers)`` function that sets
``func`` on its parser; ``func(args)`` returns the process exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

__all__ = ["main", "build_parser"]

log = logging.getLogger("robopol_clean")

#: Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_FAILURE = 1  # the job ran but some inputs failed
EXIT_USAGE = 2  # bad command line or unusable input


class CLIError(Exception):
    """An error to report as one line and exit with `EXIT_USAGE`."""


# --- subcommands (each helper adds its own block below) -------------------------------


# --- main ------------------------------------------------------------------------------
_SUBCOMMANDS: list = []  # filled by the _add_* functions above, in display order


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="robopol-clean",
        description="Artifact-aware reduction of four-channel imaging polarimetry frames.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or EXIT_OK)
    except CLIError as exc:
        print(f"robopol-clean {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
