"""The test tiers of tests/conftest.py point at things that exist (a renamed fixture or test
would silently move tests into `make test-fast`, a renamed long file to the end of `make test`)."""
from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import LONGEST_FIRST, SLOW_FIXTURES, SLOW_TESTS

ROOT = Path(__file__).resolve().parents[1]


def test_every_slow_fixture_is_defined_in_a_conftest() -> None:
    defined = {name for conftest in (ROOT / "tests").rglob("conftest.py")
               for name in re.findall(r"^def (\w+)\(", conftest.read_text(), re.MULTILINE)}
    assert SLOW_FIXTURES <= defined, SLOW_FIXTURES - defined


def test_every_listed_slow_test_exists() -> None:
    for key, why in SLOW_TESTS.items():
        path, _, name = key.partition("::")
        assert (ROOT / path).is_file(), f"SLOW_TESTS: no file {path}"
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.MULTILINE), \
                f"SLOW_TESTS: no test {name} in {path}"
        assert why, key


def test_every_long_file_exists_once() -> None:
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST), LONGEST_FIRST
    missing = [path for path in LONGEST_FIRST if not (ROOT / path).is_file()]
    assert not missing, f"LONGEST_FIRST names files that do not exist: {missing}"


def test_long_files_are_collected_first() -> None:
    """The collection order `make test` hands to its workers: LONGEST_FIRST's files, in order."""
    import subprocess
    import sys

    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/test_tiers.py", *reversed(LONGEST_FIRST)],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    files = list(dict.fromkeys(line.split("::", 1)[0] for line in listed if "::" in line))
    assert files == [*LONGEST_FIRST, "tests/test_tiers.py"], files
