"""The compatibility matrix: which third-party stacks each callback is tested on, and how.

Each cell is a test marked ``@pytest.mark.compat(row, column)`` (or ``refused="why"`` when the
test asserts that the combination is refused at fit start with a clear message). At the end of the
session ``tests/conftest.py`` collects the outcomes, prints the table and, with
``LIGHTNING_REG_MATRIX=path``, writes it there as Markdown (``make matrix`` writes
``docs/compat_matrix.md``, from which the README's "Works with" table is copied).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Columns in display order; a test may use any of these.
COLUMNS = (
    "EarlyStopping", "WeightDecayExclusion", "Mixup", "LabelSmoothing",
    "GeneralizationGapMonitor", "RegularizationMonitor", "MembershipInferenceAudit",
    "ProximalSparsity", "SAM", "stack",
)  # fmt: skip

SYMBOLS = {"passed": "pass", "failed": "FAIL", "skipped": "skip", "refused": "refused"}


@dataclass
class Cell:
    """The outcome of one (row, column) cell; several tests may share a cell (all must pass)."""

    outcomes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        for worst in ("failed", "skipped", "refused"):
            if worst in self.outcomes:
                return worst
        return "passed" if self.outcomes else ""


@dataclass
class Matrix:
    """Outcomes by row, then column, in the order tests reported them."""

    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)

    def record(self, row: str, column: str, outcome: str, note: str = "") -> None:
        """Add one test's outcome to its cell."""
        if column not in COLUMNS:
            raise ValueError(f"Unknown matrix column {column!r}; use one of {COLUMNS}.")
        cell = self.cells.setdefault(row, {}).setdefault(column, Cell())
        cell.outcomes.append(outcome)
        if note and note not in cell.notes:
            cell.notes.append(note)

    def markdown(self) -> str:
        """The table (rows x columns) and the reasons of the refused and skipped cells."""
        used = [c for c in COLUMNS if any(c in cols for cols in self.cells.values())]
        lines = [
            "| row | " + " | ".join(used) + " |",
            "|---|" + "---|" * len(used),
        ]
        reasons: list[str] = []
        for row, cols in self.cells.items():
            entries = []
            for column in used:
                cell = cols.get(column)
                if cell is None or not cell.outcome:
                    entries.append("")
                    continue
                text = SYMBOLS[cell.outcome]
                if cell.notes and cell.outcome in ("refused", "skipped", "failed"):
                    reasons.append(f"- {row} / {column}: {'; '.join(cell.notes)}")
                    text += f" [{len(reasons)}]"
                entries.append(text)
            lines.append(f"| {row} | " + " | ".join(entries) + " |")
        if reasons:
            lines += ["", *(r.replace("- ", f"- [{i}] ", 1) for i, r in enumerate(reasons, 1))]
        return "\n".join(lines) + "\n"
