"""Static checks of the threat model: no shell is ever built from data, no secret is ever formatted into logs."""

from __future__ import annotations

import re

from tests.helpers import ROOT

SOURCES = sorted([*ROOT.glob("*.py"), *(ROOT / "laion5b").glob("*.py"), *(ROOT / "tools").glob("*.py")])
SHELL = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|\beval\(|\bexec\(|pickle\.loads?\(")


def test_no_shell_and_no_code_from_data():
    offenders = [f"{path.name}:{n}" for path in SOURCES for n, line in enumerate(path.read_text().splitlines(), 1)
                 if SHELL.search(line)]  # fmt: skip
    assert offenders == []


def test_the_password_is_never_logged():
    logging_lines = [
        f"{path.name}:{n}"
        for path in SOURCES
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\blog\.\w+\(", line) and "redis_pass" in line
    ]
    assert logging_lines == []
