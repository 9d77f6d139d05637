"""Plain text for the command lines: ``HxW`` sizes in, aligned tables out.

Standard library only, in the lowest layer, so that sharding, pipeline, ``run.py`` and the
benchmarks (``gpu_check.py`` too, which runs without Ray and MLflow) share one size parser
and one table layout.
"""
from __future__ import annotations

from collections.abc import Sequence


def parse_size(text: str, minimum: int = 1) -> tuple[int, int]:
    """``"HxW"`` (e.g. ``"128x256"``) -> ``(H, W)``, both at least ``minimum``; ``ValueError`` otherwise."""
    parts = text.lower().split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        height, width = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"expected HxW such as 128x256, got {text!r}") from None
    if height < minimum or width < minimum:
        raise ValueError(f"expected HxW of at least {minimum}x{minimum}, got {text!r}")
    return height, width


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None,
                 footer: Sequence[Sequence[object]] = ()) -> str:
    """An aligned text table: the header, a rule of dashes, the rows, then (if any) a rule and ``footer``.

    Columns stand two spaces apart, each as wide as its widest cell (cells are shown with
    ``str``). ``align`` has one letter per column, ``l`` (left) or ``r`` (right); by default
    the first column is left-aligned and the others (numbers, as a rule) right-aligned.
    Trailing blanks are trimmed from every line.
    """
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"format_table: align must be one 'l' or 'r' per column ({len(header)}), got {align!r}")
    cells = [[str(c) for c in line] for line in (header, *rows, *footer)]
    if any(len(line) != len(header) for line in cells):
        raise ValueError(f"format_table: every row must have {len(header)} cells, like the header")
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(line, widths, align)).rstrip()

    rule = fmt(["-" * w for w in widths])
    body = [fmt(line) for line in cells[1:]]
    lines = [fmt(cells[0]), rule, *body[:len(rows)]]
    if footer:
        lines += [rule, *body[len(rows):]]
    return "\n".join(lines)


def bar_disabled(show_progress: bool) -> bool | None:
    """tqdm's ``disable`` for a progress bar: off unless asked for, and when asked for, drawn on a
    terminal only (``None``), so a log file gets the results, not hundreds of redraws."""
    return None if show_progress else True
