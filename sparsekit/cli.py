"""``sparsekit`` command line: ``sparsekit demo | bench | sweep | eval | show | list``.

Each subcommand lives in its own module, imported only when used, which adds its
arguments through ``add_arguments(parser)`` and runs through ``run(args)``. A user error is one line
on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo": ("sparsekit.demo", "synthetic long-context problem on CPU: dense vs streaming vs corrected"),
    "bench": ("sparsekit.bench", "time one prefill attention layer: dense baselines vs every backend x corrector"),
    "sweep": ("sparsekit.bench.sweep", "density vs quality (attention mass kept, recall@64) of every backend's "
                                       "settings, and quality at equal density against the oracle"),
    "eval": ("sparsekit.eval", "does a backend + corrector keep a real model's accuracy? retrieval, perplexity, "
                               "fidelity, locality, and a verdict"),
    "show": ("sparsekit.show", "print (and save as PNG) the pattern of a spec: which keys each query sees"),
    "list": ("sparsekit.cli", "registered backends, correctors, interpolations and kernel implementations"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # for `sparsekit list`
    pass


def _status(names, get, kind):
    """``name`` or ``name (unavailable: reason)`` for each registered plug-in."""
    import warnings

    out = []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls = get(name)
            if kind == "implementation":
                why = getattr(cls, "available_reason", None)
                why = why() if callable(why) else None
            else:
                why = None
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        out.append(name if not why else f"{name} (unavailable: {why})")
    return out


def run(args) -> int:  # `sparsekit list`
    from .executor import IMPLEMENTATIONS
    from .registry import BACKENDS, CORRECTORS, INTERPOLATIONS

    print("backends:        ", ", ".join(_status(BACKENDS.names(), BACKENDS.get, "backend")))
    print("correctors:      ", ", ".join(_status(CORRECTORS.names(), CORRECTORS.get, "corrector")))
    print("interpolations:  ", ", ".join(_status(INTERPOLATIONS.names(), INTERPOLATIONS.get, "interpolation")))
    print("implementations: ", ", ".join(_status(IMPLEMENTATIONS.names(), IMPLEMENTATIONS.get, "implementation")))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from . import __version__

    parser = argparse.ArgumentParser(prog="sparsekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sparsekit {__version__} (distribution sparsekit-prefill)")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    wanted = wanted if wanted in COMMANDS else None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:  # import only the module that runs
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        rc = int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
        sys.stdout.flush()  # a reader that left (`| head`) shows up here, not at interpreter exit
        return rc
    except BrokenPipeError:  # `sparsekit list | head -2`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("sparsekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
