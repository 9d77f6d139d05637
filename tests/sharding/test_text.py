"""The one size parser and the one table layout of every command line."""
from __future__ import annotations

import pytest

from sharding.text import format_table, parse_size


@pytest.mark.parametrize(("text", "size"), [("320x640", (320, 640)), ("128X256", (128, 256)), (" 64 x 96 ", (64, 96))])
def test_sizes_are_height_by_width(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("bad", "message"), [("320", "such as 128x256"), ("320x", "such as 128x256"),
                                              ("axb", "such as 128x256"), ("1x2x3", "such as 128x256"),
                                              ("16x16", "at least 32x32")])
def test_bad_sizes_are_refused_with_one_message(bad: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"expected HxW .*{message}.*{bad!r}"):
        parse_size(bad, minimum=32)


def test_table_aligns_columns_under_a_rule() -> None:
    table = format_table(["name", "count"], [["a", 1], ["bbb", 22]], footer=[["total", 23]])
    assert table.splitlines() == [
        "name   count",
        "-----  -----",
        "a          1",
        "bbb       22",
        "-----  -----",
        "total     23",
    ]


def test_table_alignment_per_column_and_no_trailing_blanks() -> None:
    table = format_table(["x", "long header"], [["wide cell", ""]], align="ll")
    assert table.splitlines() == ["x          long header", "---------  -----------", "wide cell"]
    assert format_table(["a", "b"], []) == "a  b\n-  -"
    with pytest.raises(ValueError, match="one 'l' or 'r' per column"):
        format_table(["a", "b"], [], align="l")
    with pytest.raises(ValueError, match="2 cells"):
        format_table(["a", "b"], [["only one"]])
