"""`workers sam convert TEMPLATE [--overrides FILE]`: a template as a native mapping file."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_sam_parser", "cmd_sam_convert"]


def add_sam_parser(sub: Any, epilog: str) -> None:
    """`workers sam ...` under the `workers` command's subparsers."""
    sam = sub.add_parser(
        "sam",
        help="SAM and CloudFormation templates",
        description="Work with a SAM or CloudFormation template's event source mappings.",
        epilog=epilog,
    )
    ssub = sam.add_subparsers(title="sam commands", metavar="SAM_COMMAND", required=True)
    convert = ssub.add_parser(
        "convert",
        help="print a template's functions and mappings as a mapping file",
        description=(
            "Print the mapping file (YAML) equivalent to TEMPLATE with its overrides: ${VAR}"
            " references of the overrides file are kept as written, parameters are resolved."
            " Code paths are relative to the template's directory: save the output beside it."
        ),
    )
    convert.add_argument("template", help="a SAM or CloudFormation template (YAML or JSON)")
    convert.add_argument(
        "--overrides",
        metavar="FILE",
        help="where the template's sources and destinations are here, parameter values,"
        " function settings",
    )
    convert.set_defaults(command=cmd_sam_convert)


def cmd_sam_convert(args: argparse.Namespace) -> int:
    from workers.app.loader import is_template_file
    from workers.app.sam import convert, render_yaml

    if not is_template_file(args.template):
        print(
            f"error: {args.template}: not a SAM or CloudFormation template (no Resources)",
            file=sys.stderr,
        )
        return 2
    sys.stdout.write(render_yaml(convert(args.template, args.overrides, substituted=False)))
    return 0
