"""The summary of the saved error files: counts by status, top reasons, per subset, as text tables."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from laion5b import errorfiles
from laion5b.tables import table
from laion5b.tasks import is_transient

MAX_DISTINCT = 1000
"""Distinct statuses, reasons and subsets counted apiece; further ones are counted under OTHER."""
OTHER = "(other)"
REASON_CHARS = 80
TOP = 15


@dataclass
class Summary:
    """Counts over error records."""

    records: int = 0
    unreadable: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    by_subset: dict[str, Counter[str]] = field(default_factory=dict)
    transient: set[str] = field(default_factory=set)

    def add(self, record: dict) -> None:
        raw = record.get("status")
        status = _bounded(self.by_status, str(raw))
        if isinstance(raw, int | str) and is_transient(raw):
            self.transient.add(status)
        self.records += 1
        self.by_status[status] += 1
        reason = " ".join(str(record.get("error_msg", "")).split())[:REASON_CHARS]
        self.by_reason[_bounded(self.by_reason, reason)] += 1
        subset = _bounded(self.by_subset, str(record.get("subset", "(none)")))
        self.by_subset.setdefault(subset, Counter())[status] += 1


def _bounded(seen: Counter[str] | dict, value: str) -> str:
    return value if value in seen or len(seen) < MAX_DISTINCT else OTHER


def summarize(paths: Iterable[Path]) -> Summary:
    """Count every record of the given error files, reading them line by line."""
    summary = Summary()
    for path in paths:
        for _, _, line in errorfiles.lines_from(path):
            record = errorfiles.parse(line)
            if record is None:
                summary.unreadable += bool(line.strip())
            else:
                summary.add(record)
    return summary


def render(summary: Summary, files: int) -> str:
    """The summary as three text tables."""
    total = max(summary.records, 1)
    status_rows = [
        [status, f"{count:,}", f"{100 * count / total:.1f}%", "yes" if status in summary.transient else "no"]
        for status, count in summary.by_status.most_common()
    ]
    reason_rows = [[f"{count:,}", reason or "(empty)"] for reason, count in summary.by_reason.most_common(TOP)]
    subset_rows = [
        [subset, f"{sum(counts.values()):,}", ", ".join(f"{s} {n:,}" for s, n in counts.most_common(3))]
        for subset, counts in sorted(summary.by_subset.items())
    ]
    parts = [
        f"{summary.records:,} error records in {files} files"
        + (f" ({summary.unreadable:,} unreadable lines skipped)" if summary.unreadable else ""),
        table(["status", "records", "share", "transient"], status_rows, right=(1, 2)),
        table(["records", "top reasons (error_msg)"], reason_rows, right=(0,)),
        table(["subset", "records", "top statuses"], subset_rows, right=(1,)),
    ]
    return "\n\n".join(parts) + "\n"
