"""Markdown helpers of the dataset card: tables, cell escaping, number formatting."""
from __future__ import annotations


def fmt(v: float | None, nd: int = 4) -> str:
    """A number for a table cell: integers as such, others to `nd` significant digits, None as n/a."""
    if v is None:
        return "n/a"
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.{nd}g}"


def md_escape(s) -> str:
    """`s` as text safe inside a Markdown table cell (pipes escaped)."""
    return str(s).replace("|", "\\|")


def table(header: list[str], rows: list[list], align: list[str] | None = None) -> list[str]:
    """A Markdown table's lines: the header, the alignment row (default left), one line per row."""
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in rows]
    return lines
