"""Markdown pieces the report's sections share."""

from __future__ import annotations

MIB = 2**20


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table, one string per line."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"
