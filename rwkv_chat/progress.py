"""Loading progress on a terminal: a rich bar fed by the engine's `progress(done, total, what)` callback.

The engine never draws anything; whoever loads a model passes a callback (the CLI and the
`rwkv` compatibility layer use `terminal_bar`, the TUI loads nothing itself).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

ProgressCallback = Callable[[int, int, str], None]


@contextlib.contextmanager
def terminal_bar(path: str | Path, title: str) -> Iterator[ProgressCallback | None]:
    """Yields a callback drawing a transient bar on stderr, or None when stderr is no terminal.

    >>> with terminal_bar(path, f"Reading {path}") as progress:
    ...     model = RWKV(path, strategy, progress=progress)
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    name = Path(path).name
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(title, total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"Loading {name}: {what}")

        yield update


@contextlib.contextmanager
def terminal_status(text: str) -> Iterator[None]:
    """A spinner with `text` on stderr while the block runs (nothing when stderr is no terminal)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(text):
        yield
