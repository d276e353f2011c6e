"""Markdown tables, as the report, the sweeps' report and the model card print them."""

from __future__ import annotations


def table_row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_head(header: list[str]) -> list[str]:
    return [table_row(header), table_row(["---"] * len(header))]


def shape_text(shape: list[int]) -> str:
    """[1, 375, 3072] as the tables show it: [1,375,3072]."""
    return "[" + ",".join(str(d) for d in shape) + "]"
