"""metrics.csv: one row per logged step of a run, cut back to the checkpoint's step when it resumes."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..errors import UserError
from ..files import write_atomically

__all__ = ["MetricsLog"]


class MetricsLog:
    """metrics.csv: one row per logged step. Each append opens, writes and closes the file, so it is never
    left open and a killed run loses nothing written."""

    def __init__(self, path: Path, markups: tuple[str, ...]) -> None:
        self.path = path
        self.header = ["step", "elapsed_s", "lr", "loss", "train_nme", "data"] + [f"val_nme_{m}" for m in markups]

    def start(self, resume_step: int | None) -> None:
        """A new file with its header, or on resume the existing one cut back to rows <= resume_step."""
        rows: list[list[str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header == self.header:
                    rows = [r for r in reader if r and r[0].isdigit() and int(r[0]) <= resume_step]
        text = _csv_text([self.header, *rows])
        write_atomically(self.path, text.encode(), what="metrics file")

    def append(self, row: list) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow(row)
        except OSError as exc:
            raise UserError(f"cannot write metrics file {str(self.path)!r}: {exc.strerror or exc}; free some space "
                            f"or choose another --out") from exc


def _csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()
