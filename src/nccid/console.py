"""Terminal output shared by the CLI and the demo: progress bars (only on a terminal) and summary tables."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

# In a pipe or a log, lines are not folded at 80 columns: paths and reasons stay greppable.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[..., None]]:
    """A spinner with counts and bytes on a terminal; a no-op callback otherwise (CI logs stay clean).

    The callback takes (count, bytes) or (phase, count, bytes).
    """
    if not sys.stderr.isatty():
        yield lambda *args: None
        return
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=None),
        TextColumn("{task.fields[objects]} objects"),
        DownloadColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=None, objects=0)
        seen = {"objects": 0}

        def tick(*args: object) -> None:
            *phase, count, nbytes = args
            seen["objects"] += int(count)  # type: ignore[arg-type]
            label = f"{description} ({phase[0]})" if phase else description
            bar.update(task, advance=int(nbytes), objects=seen["objects"], description=label)  # type: ignore[arg-type]

        yield tick


def human_bytes(n: float) -> str:
    """A byte count in decimal units for people: 512 -> '512 B', 1_500_000 -> '1.5 MB' (TB at most)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def table(title: str, columns: list[str], rows: list[list[object]]) -> Table:
    """A rich Table for a summary: first column left-aligned (names), the rest right-aligned (numbers)."""
    out = Table(title=title, title_justify="left", header_style="bold")
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*[escape(str(v)) for v in row])  # cells are data (keys, reasons): never terminal markup
    return out
