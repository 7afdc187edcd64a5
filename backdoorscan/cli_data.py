"""Command-line options for training data as it is published (tables and image folders).

``--text-column``, ``--label-column``, ``--image-size`` and ``--max-length`` (see
``scanner/published.py``): the decorator takes them off the command's arguments and keeps them
in the click context, where ``cli_options.build_run_options`` reads them into ``RunOptions``,
so that the commands' signatures need not list them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

META_KEY = "backdoorscan.published"
NAMES = ("text_column", "label_column", "image_size", "max_length")


def published_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the table and image-folder options to a command that reads ``--data``."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in NAMES if name in kwargs}
        click.get_current_context().meta[META_KEY] = given
        return fn(*args, **kwargs)

    opts = [
        click.option(
            "--text-column",
            default="text",
            show_default=True,
            help="Tables (.csv, .jsonl, .parquet): the column of texts, or of image paths "
            "(relative to the table's folder).",
        ),
        click.option(
            "--label-column",
            default="label",
            show_default=True,
            help="Tables: the column of labels (class indices, or names mapped through the "
            "model's label2id, else in sorted order).",
        ),
        click.option(
            "--image-size",
            type=click.IntRange(1, 1 << 16),
            metavar="PIXELS",
            help="Images: resize to PIXELS x PIXELS (default: the model folder's "
            "preprocessor_config.json, else the model's input).",
        ),
        click.option(
            "--max-length",
            type=click.IntRange(1, 1 << 16),
            metavar="TOKENS",
            help="Texts: truncate to this many tokens (default: the model's limit, at most 512).",
        ),
    ]
    for opt in reversed(opts):
        command = opt(command)
    return command


def published_settings() -> dict[str, Any]:
    """The values of the options above for the running command (none outside one)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(META_KEY, {})) if ctx is not None else {}
