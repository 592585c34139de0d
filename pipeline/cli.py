"""``morphset`` command line. Each subcommand lives in ``pipeline/commands/<name>.py`` and provides
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

Common options on every command: ``--manifest PATH`` and ``--set KEY.PATH=VALUE`` (repeatable);
command-specific flags are shorthands for manifest keys and override them.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from pipeline import __version__

# data-flow order; the help lists them in this order
COMMANDS = [
    "ingest",
    "detect",
    "landmarks",
    "embed",
    "crop",
    "fit",
    "refine",
    "export",
    "build",
    "status",
    "verify",
    "config",
    "synth",
    "calibrate",
    "train",
    "evaluate",
    "overlap",
    "export_mesh",
    "demo",
]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only when it says something (None means: the manifest's value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, [], False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--manifest", default=None, help="data manifest YAML (default: the repository's data_manifest.yaml)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override any manifest value, e.g. --set stages.fit.max_iterations=10 (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="morphset",
        description="Offline data preparation for 3D face research: person-labelled photos -> MTCNN -> 68 landmarks "
        "-> multi-image 3DMM fit -> Parquet training sets, on Dask; plus a compact trainer and evaluation.",
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"morphset {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"pipeline.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pipeline.commands.{name}":
                continue
            raise
        p = sub.add_parser(
            name.replace("_", "-"),
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            formatter_class=_Formatter,
            allow_abbrev=False,  # --land is not --landmarks: a typo is an error, not a guess
        )
        mod.add_arguments(p)
        add_common(p)
        p.set_defaults(_run=mod.run)
    return parser


def describe_os_error(exc: OSError) -> str:
    """``path: No space left on device (ENOSPC)``: the file and the errno's meaning."""
    if exc.errno is None or not exc.strerror:
        return str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's log noise off the terminal
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from pipeline.config.manifest import ManifestError
    from pipeline.config.schemas import SchemaError
    from pipeline.errors import MorphsetError

    try:
        return int(args._run(args) or 0)
    except (ManifestError, SchemaError, FileNotFoundError, ValueError) as exc:
        print(f"morphset {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MorphsetError as exc:
        print(f"morphset {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ImportError as exc:  # an optional package a URL or setting needs (s3fs for s3://, …)
        hint = f" (pip install {exc.name})" if getattr(exc, "name", None) else ""
        print(f"morphset {args.command}: error: a package is missing: {exc}{hint}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: not an error (before OSError)
        # stdout is gone: point it at devnull so the interpreter's final flush does not complain
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # the file system refused (full, read-only, corrupt shard): one line
        print(f"morphset {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"morphset {args.command}: interrupted; committed shards are kept, rerun to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
