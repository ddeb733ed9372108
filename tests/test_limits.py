"""Request bodies: sound JSON text only."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from kiban._bodylimit import has_lone_surrogate

texts = st.text(
    alphabet=st.one_of(
        st.characters(),  # includes astral characters (escaped as surrogate pairs)
        st.sampled_from(["\ud800", "\udc00", "\udbff", "\udfff", "\\", "u", "d", "8", "0"]),
    )
)


def _lone(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@given(st.lists(texts, max_size=4))
def test_detects_exactly_the_bodies_python_cannot_encode(values: list[str]) -> None:
    body = json.dumps({"values": values}).encode()  # ensure_ascii: every escape explicit
    assert has_lone_surrogate(body) == any(_lone(value) for value in values)


def test_examples() -> None:
    assert has_lone_surrogate(rb'{"a": "\ud800"}')
    assert has_lone_surrogate(rb'{"a": "\udc00x"}')
    assert not has_lone_surrogate(rb'{"a": "\ud83d\ude00"}')
    assert not has_lone_surrogate(rb'{"a": "\\ud800"}')  # an escaped backslash
    assert has_lone_surrogate(rb'{"a": "\\\ud800"}')
