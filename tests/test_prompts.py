"""Reading a request body: the fast parser reads every body as the standard library would."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aspy import prompts
from aspy.prompts import parse_json, read_request

# Any JSON value, with what tells the two parsers apart: lone surrogates, integers past
# 64 bits, NaN and infinities (json writes them as NaN and Infinity).
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", 7]),
    "content": values | st.lists(st.fixed_dictionaries({
        "type": st.sampled_from(["text", "tool_result", "image"]), "text": values,
        "tool_use_id": values, "is_error": values, "cache_control": values})),
}), max_size=4)
bodies = st.fixed_dictionaries({"model": values, "stream": values, "messages": messages},
                               optional={"tools": values, "metadata": values, "system": values})


def standard_facts(body: bytes, claude_code: bool, monkeypatch: pytest.MonkeyPatch):
    """Return the facts read with the standard library's parser alone."""
    with monkeypatch.context() as m:
        m.setattr(prompts, "parse_json", json.loads)
        return read_request(body, "application/json", claude_code=claude_code)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, claude_code=st.booleans())
def test_a_body_reads_the_same_as_with_the_standard_parser(body, claude_code, monkeypatch):
    raw = json.dumps(body).encode()
    assert read_request(raw, "application/json", claude_code=claude_code) == \
        standard_facts(raw, claude_code, monkeypatch)


@pytest.mark.parametrize("raw", [
    b'"\\ud800"', b'[NaN, Infinity, -Infinity]', b'1e400',
    '{"a": "é"}'.encode("utf-16"), b'{"a": 1, "a": 2}',
])
def test_what_only_the_standard_parser_accepts_is_read_by_it(raw):
    expected = json.loads(raw)
    got = parse_json(raw)
    assert json.dumps(got) == json.dumps(expected)


def test_an_integer_past_64_bits_is_a_number_still():
    # orjson makes it a float: aspy reads no number that large (counts stop at 10**12).
    assert parse_json(b"[18446744073709551616]") == [float(18446744073709551616)]


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000, b"{", b"\xff\xfe\xfd", b'{"a": 1,}'])
def test_what_neither_accepts_gives_empty_facts(raw):
    assert read_request(raw, "application/json") == read_request(b"", "application/json")


def test_a_lone_surrogate_in_the_prompt_is_read_and_made_clean():
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    facts = read_request(raw, "application/json")
    assert facts.model == "m" and facts.prompt == "hi \ufffd there"
