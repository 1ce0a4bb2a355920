"""Every test the README's Guarantees table names exists: a promise never points at a test that moved or went."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _guarantee_rows() -> list[str]:
    section = REPO.joinpath("README.md").read_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| promise")]


def test_every_test_named_in_the_guarantees_table_exists():
    rows = _guarantee_rows()
    assert len(rows) >= 18  # one per promise of issue 11
    missing = []
    for row in rows:
        current_file = None
        for reference in re.findall(r"`([^`]*(?:\.py|::\w+)[^`]*)`", row.rsplit("|", 2)[-2]):
            path, _, test = reference.partition("::")
            if path:
                current_file = REPO / "tests" / path
            if current_file is None or not current_file.is_file():
                missing.append(f"{reference}: no file {current_file}")
                continue
            if test and not re.search(rf"^def {test}\(", current_file.read_text(), re.M):
                missing.append(f"{reference}: no test {test} in {current_file.relative_to(REPO)}")
    assert missing == []
