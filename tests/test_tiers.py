"""The test tiers of tests/conftest.py point at things that exist (a renamed fixture or test
would silently move tests into `make test-fast`)."""
from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import SLOW_FIXTURES, SLOW_TESTS

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
