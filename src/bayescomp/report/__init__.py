"""Reports: tables for the terminal (plots and pages come later)."""

from .table import format_table, summary_rows

__all__ = ["format_table", "summary_rows"]
