"""Loading what `workers` commands are given: a mapping file, or a SAM or CloudFormation
template with its overrides file (told apart by content)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from workers.app.config import Config, ConfigError, Problem, load_config

__all__ = ["CONFIG_HELP", "Loaded", "add_template_options", "is_template_file", "load"]

CONFIG_HELP = "mapping file (YAML), or a SAM or CloudFormation template"


@dataclass
class Loaded:
    config: Config
    # Said once at start-up: what a template has that does not run here (warnings), and what
    # was read as expected but is worth saying (notes: properties ignored, settings derived).
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # A template's SourceAccessConfigurations, per mapping (listed by `validate`).
    access: list[str] = field(default_factory=list)


def is_template_file(path: str | Path) -> bool:
    from workers.app.sam.template import is_template

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False  # load_config says why
    return is_template(text)


def load(
    path: str | Path,
    overrides: str | Path | None = None,
    *,
    strict: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Loaded:
    """The configuration at `path`: a mapping file, or a template (`overrides` saying where its
    sources and destinations are here; `strict` refusing what cannot run)."""
    if is_template_file(path):
        from workers.app.sam import load_template

        config, notes = load_template(path, overrides, strict=strict, environ=environ)
        return Loaded(config, notes.warnings(), notes.infos(), notes.access)
    if overrides is not None:
        raise ConfigError(
            overrides,
            [
                Problem(
                    "",
                    "--overrides goes with a SAM or CloudFormation template;"
                    f" {path} is a mapping file",
                )
            ],
        )
    return Loaded(load_config(path, environ))


def add_template_options(parser: argparse.ArgumentParser, strict: bool = False) -> None:
    """`--overrides FILE` (and `--strict`) for a command that takes CONFIG."""
    parser.add_argument(
        "--overrides",
        metavar="FILE",
        help="with a template: where its sources and destinations are here, parameter values,"
        " function settings",
    )
    if strict:
        parser.add_argument(
            "--strict",
            action="store_true",
            help="with a template: events that are not event source mappings, and mappings"
            " that cannot run here, are errors",
        )
