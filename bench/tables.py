"""The markdown tables the benchmarks print after their JSON."""

from __future__ import annotations


def print_markdown_table(header: list[str], rows: list[list]) -> None:
    """A header line, its separator, then one line a row (cells as str() gives them)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
