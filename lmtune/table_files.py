"""Write DataFrames as Markdown (for reading), CSV (for spreadsheets) and Parquet (for pandas)."""
from __future__ import annotations

import math
import numbers
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from lmcore import files


def write_table(frame: pd.DataFrame, stem: Path, parquet: bool = True) -> None:
    """`stem`.csv, `stem`.md and (if `parquet`) `stem`.parquet."""
    files.write_text(stem.with_name(f"{stem.name}.csv"), frame.to_csv(index=False))
    files.write_text(stem.with_name(f"{stem.name}.md"), markdown(frame) + "\n")
    if parquet:
        # Parquet needs one type per column; config columns may mix None with numbers or strings.
        typed = frame.astype({c: "string" for c in frame.columns if frame[c].dtype == object})
        files.write_atomically(stem.with_name(f"{stem.name}.parquet"), lambda f: typed.to_parquet(f, index=False))


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table, numbers formatted for reading (no tabulate needed)."""
    if frame.empty:
        return "(no trials)"
    header = [str(c) for c in frame.columns]
    rows = [[_cell(c, v) for c, v in zip(frame.columns, row)] for row in frame.itertuples(index=False)]
    types = pd.api.types
    numeric = [types.is_numeric_dtype(frame[c]) and not types.is_bool_dtype(frame[c]) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if column.endswith("_at") and isinstance(value, numbers.Real):  # unix times: when a trial started, finished
        return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S")
    if column == "params" and isinstance(value, numbers.Real):
        return f"{float(value) / 1e6:.2f}M" if value >= 1e6 else f"{float(value) / 1e3:.1f}k"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isinf(value):
            return "inf"
        if "ppl" in column or column.endswith("_h"):
            return f"{value:.2f}"
        if column in ("time_s", "tokens_per_s"):
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
