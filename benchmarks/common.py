"""What every benchmark shares: printing a results table and saving it as JSON.

Benchmarks write their results under `benchmarks/results/` (ignored by git); this module
must not time anything itself or import the code being measured.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def report(name: str, rows: list[dict[str, object]], columns: list[str]) -> Path:
    """Print `rows` as an aligned table of `columns` and write them to results/<name>.json.

    Returns the path of the JSON file.
    """
    cells = [[_format_cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [
        max([len(column)] + [len(line[index]) for line in cells])
        for index, column in enumerate(columns)
    ]
    print(f"\n{name}")
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(_align(cell, width) for cell, width in zip(line, widths, strict=True)))

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {
        "benchmark": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "columns": columns,
        "rows": rows,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"results: {path}")
    return path


def _format_cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _align(cell: str, width: int) -> str:
    # Numbers line up on the right, words on the left.
    try:
        float(cell.rstrip("x%s"))
    except ValueError:
        return cell.ljust(width)
    return cell.rjust(width)
