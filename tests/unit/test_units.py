"""Sizes with units as administrators type them (thinblock.units)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thinblock.errors import InvalidArgument
from thinblock.units import GiB, KiB, Limit, MiB, PiB, TiB, format_duration, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("512K", 512 * KiB),
        ("512k", 512 * KiB),
        ("16MiB", 16 * MiB),
        ("16mib", 16 * MiB),
        ("1E", 1 << 60),
        ("1EiB", 1 << 60),
        ("1G", GiB),
        ("2TiB", 2 * TiB),
        ("1P", PiB),
        (" 1 G ", GiB),
        ("1.5K", 1536),
        ("0.5GiB", 512 * MiB),
        ("100B", 100),
        (4096, 4096),
    ],
)
def test_parse_size_accepts_what_administrators_type(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1X", "-1", "1.5", "0.3K", "1 GiBs", "G", "1e9", "1,5G"])
def test_parse_size_refuses_anything_else(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_parse_size_refuses_negative_int() -> None:
    with pytest.raises(InvalidArgument):
        parse_size(-1)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "-"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (MiB, "1 MiB"),
        (64 * GiB, "64 GiB"),
        (100 * GiB, "100 GiB"),
        (3 * TiB // 2, "1.5 TiB"),
        (2 * PiB, "2 PiB"),
    ],
)
def test_format_size(n: int | None, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(min_value=0, max_value=8 * PiB), st.sampled_from(["", "K", "M", "G", "T"]))
def test_whole_units_round_trip(n: int, unit: str) -> None:
    text = f"{n}{unit}"
    value = parse_size(text)
    assert value == n * {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}[unit]
    # What format_size prints parses back to the same value whenever it printed it exactly.
    shown = format_size(value)
    if "." not in shown:
        assert parse_size(shown.replace(" ", "")) == value


def test_limit_percent_stays_relative() -> None:
    limit = Limit.parse("80%")
    assert limit.percent == 80
    assert limit.resolve(100 * GiB) == 80 * GiB
    assert limit.resolve(200 * GiB) == 160 * GiB  # growing the volume moves the limit
    assert str(limit) == "80%"


def test_limit_bytes() -> None:
    limit = Limit.parse("10G")
    assert limit.bytes == 10 * GiB
    assert limit.resolve(100 * GiB) == 10 * GiB
    assert str(limit) == "10 GiB"
    assert Limit.parse(4096).bytes == 4096


@pytest.mark.parametrize("text", ["0%", "101%", "-5%", "x%", "0", "abc"])
def test_limit_refuses_nonsense(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Limit.parse(text)


def test_limit_is_either_bytes_or_percent() -> None:
    with pytest.raises(InvalidArgument):
        Limit()
    with pytest.raises(InvalidArgument):
        Limit(bytes=1, percent=1.0)


@pytest.mark.parametrize("text", ["16MB", "10GB", "1tb", "5kB"])
def test_si_looking_units_are_refused_with_a_hint_never_read_as_binary(text: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_size(text)
    number, unit = text[:-2], text[-2].upper()
    assert f"'{text}' is ambiguous: write {number}{unit}iB for binary units" in str(refused.value)


@pytest.mark.parametrize("text", ["-5G", "-1", " -2.5MiB"])
def test_negative_sizes_say_so(text: str) -> None:
    with pytest.raises(InvalidArgument, match="a size cannot be negative"):
        parse_size(text)


def test_format_duration_shows_the_largest_units() -> None:
    assert [format_duration(s) for s in (0, 12.9, 250, 7500, 273600)] == [
        "0s",
        "12s",
        "4m 10s",
        "2h 5m",
        "3d 4h",
    ]
    assert format_duration(273600, parts=3) == "3d 4h 0m"
    assert format_duration(7507, parts=3) == "2h 5m 7s"
    assert format_duration(250, parts=3) == "4m 10s"
