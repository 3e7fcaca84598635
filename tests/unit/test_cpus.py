from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner import cpus


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", set()),
        ("\n", set()),
        ("5", {5}),
        ("0-3\n", {0, 1, 2, 3}),
        (" 0-1 , 8 ,10-11 ", {0, 1, 8, 10, 11}),
        ("0-7:2/4", {0, 1, 4, 5}),
        ("1-9:1/3", {1, 4, 7}),
        ("0-3,2-5", {0, 1, 2, 3, 4, 5}),
    ],
)
def test_parse(text: str, expected: set[int]) -> None:
    assert cpus.parse(text) == expected


@pytest.mark.parametrize("text", ["x", "1-", "-1", "3-1", "1,,2", "0-7:3/2", "0-7:0/2", "1 2"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(cpus.CpuListError, match="invalid CPU list"):
        cpus.parse(text)


@pytest.mark.parametrize(
    ("cpuset", "text"),
    [(set(), ""), ({3}, "3"), ({0, 1, 2, 3, 8, 10, 11}, "0-3,8,10-11"), ({1, 3, 5}, "1,3,5")],
)
def test_format(cpuset: set[int], text: str) -> None:
    assert cpus.format(cpuset) == text


@given(st.sets(st.integers(0, 1023)))
def test_round_trip(cpuset: set[int]) -> None:
    assert cpus.parse(cpus.format(cpuset)) == cpuset
    assert cpus.parse(cpus.format(cpuset) + "\n") == cpuset


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0-50000000", "beyond this node's possible CPUs (0-7)"),
        ("0-4294967295:1/4294967295", "beyond"),
        ("8", "beyond"),
        ("0-7,0-7", "more CPUs than this node has (8)"),
        (",".join(["3"] * 9), "more CPUs than this node has"),
    ],
)
def test_a_bound_refuses_before_expanding(text: str, words: str) -> None:
    with pytest.raises(cpus.CpuListError, match=words.replace("(", r"\(").replace(")", r"\)")):
        cpus.parse(text, bound=8)


def test_a_bound_admits_what_the_node_has() -> None:
    assert cpus.parse("0-7", bound=8) == set(range(8))
    assert cpus.parse("0-7:1/2", bound=8) == {0, 2, 4, 6}


def test_errors_quote_a_long_list_briefly() -> None:
    with pytest.raises(cpus.CpuListError) as e:
        cpus.parse("x" * 60000)
    assert len(str(e.value)) < 200
