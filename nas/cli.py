"""`vmoe-nas`: one entry point, one subcommand per step of the flow. Each subcommand is a thin layer
over a Python function of the same name."""

from __future__ import annotations

import argparse
import json
import sys

from search_spaces import ConfigError, describe, load_arch


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


def cmd_describe(args: argparse.Namespace) -> None:
    info = describe(load_arch(args.arch))
    if args.json:
        return _print_json(info)
    print(f"{info['name']}  (hash {info['config_hash']})")
    for block in info["blocks"]:
        print(f"  block {block['index']:>2}: {block['mlp']}")
    print(f"params total:  {info['params_total']:,}")
    print(f"params active: {info['params_active']:,} per image")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmoe-nas", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("describe", help="blocks and parameter counts of an architecture")
    p.add_argument("arch", help="architecture YAML file or preset name")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_describe)
    return parser


# Errors a user can fix get one line naming what to fix, not a traceback.
USER_ERRORS = (ConfigError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        print(f"vmoe-nas {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vmoe-nas {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
