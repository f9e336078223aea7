"""``sparsekit`` command line: ``sparsekit demo | bench | eval | list``.

Each subcommand lives in its own module, imported only when used, which adds its
arguments through ``add_arguments(parser)`` and runs through ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo": ("sparsekit.demo", "synthetic long-context problem on CPU: dense vs streaming vs corrected"),
    "bench": ("sparsekit.bench", "time one prefill attention layer on a GPU (dense baselines vs every backend x corrector)"),
    "eval": ("sparsekit.eval", "accuracy of sparse prefill configs on a real model (retrieval, perplexity, fidelity)"),
    "list": ("sparsekit.cli", "registered backends, correctors and interpolations"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # for `sparsekit list`
    pass


def run(args) -> int:  # `sparsekit list`
    from . import available_backends, available_correctors, available_interpolations

    print("backends:       ", ", ".join(available_backends()))
    print("correctors:     ", ", ".join(available_correctors()))
    print("interpolations: ", ", ".join(available_interpolations()))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sparsekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:  # import only the module that runs
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
