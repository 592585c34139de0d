"""``morphset config``: the effective manifest, as every command resolves it."""

from __future__ import annotations

import argparse

HELP = "print the effective manifest (defaults < manifest file < what RUN remembers < --set) as YAML"
DESCRIPTION = (
    "Print the manifest a command would use: the packaged defaults, overlaid by --manifest (a partial "
    "file needs only the keys it changes), by what RUN/run.json remembers when a run is given, and by "
    "--set. With --key, only that dotted key."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run", nargs="?", default=None, help="a run directory or URL whose remembered settings apply"
    )
    p.add_argument("--key", default=None, help="print only this dotted key, e.g. stages.fit")
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")


def run(args: argparse.Namespace) -> int:
    import json

    import yaml

    from pipeline import api

    value = api.config(args.run, overrides=args.overrides, manifest=args.manifest, key=args.key)
    if args.json:
        print(json.dumps(value, indent=1, sort_keys=True, default=str))
    else:
        print(yaml.safe_dump(value, sort_keys=False, allow_unicode=True).rstrip())
    return 0
