"""Terminal output that shows dynamic text exactly as it is.

rich reads ``[...]`` as markup and ``:name:`` as emoji: ``pip install 'flexai[nvidia]'`` would print as
``pip install 'flexai'`` and ``line :100:`` as an emoji. Everything here prints through consoles with markup,
emoji and highlighting off, and wraps each piece of data in ``rich.text.Text``; style is given as a ``style``
argument, never written into the text.

- ``out`` / ``err``: the consoles (stdout, stderr).
- ``text(value)``: one table cell or line of data, shown verbatim.
- ``error(message)``: ``error: MESSAGE`` on stderr.
- ``fail(message)``: bad input, exit code 2. ``die(message)``: the daemon is unreachable or failed, exit code 1.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

__all__ = ["BAD_INPUT", "FAILURE", "die", "err", "error", "fail", "out", "progress_bar", "text"]

BAD_INPUT = 2
"""Exit code: the input was refused (by the CLI or by the server); the caller must change something."""
FAILURE = 1
"""Exit code: the daemon could not be reached or failed."""

out = Console(width=None if sys.stdout.isatty() else 120, markup=False, emoji=False, highlight=False)
err = Console(stderr=True, markup=False, emoji=False, highlight=False)


def progress_bar() -> Progress:
    """The bar long work shows: description, bar, done of total, time (left behind only on a terminal)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out,
        transient=not sys.stdout.isatty(),
    )


def text(value: object, style: str = "") -> Text:
    """``value`` as literal text: no markup, no emoji codes."""
    return Text("" if value is None else str(value), style=style)


def error(message: str) -> None:
    """``error: MESSAGE`` on stderr, one line (not wrapped), message shown verbatim."""
    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Bad input: one clear line on stderr, exit code 2."""
    error(message)
    raise typer.Exit(code=BAD_INPUT)


def die(message: str) -> NoReturn:
    """The daemon is unreachable or failed: one line on stderr, exit code 1."""
    error(message)
    raise typer.Exit(code=FAILURE)
