"""Plain text tables for the operations scripts' reports."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """A table with a header and a rule; columns whose index is in ``right`` are right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, rows)])
