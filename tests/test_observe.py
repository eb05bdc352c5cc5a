"""The stream parser and JSON reader on every real capture, and on any split of the bytes."""
from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aspy import observe
from aspy.billing import context_of, tokens
from aspy.observe import JsonObserver, SseObserver
from aspy.prompts import read_request
from helpers import EXPECTED, SSE, billed, parse, vercel_stream

JSON = SSE.parent / "json"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_real_capture_gives_its_usage_stop_reason_tools_and_thinking(name):
    model, stop, usage, tools, thinking = EXPECTED[name]
    obs = parse((SSE / name).read_bytes())
    assert obs.parse_error is None
    assert obs.model == model
    assert obs.stop_reason == stop
    assert billed(obs).astuple() == usage
    assert [t.name for t in obs.tool_uses] == tools
    assert len(obs.thinking) == thinking


def test_every_sse_capture_is_covered():
    assert {p.name for p in SSE.glob("*.sse")} == set(EXPECTED)


def test_compaction_context_follows_the_last_iteration():
    obs = parse((SSE / "pydantic-ai_compaction_cache_read_sonnet46.sse").read_bytes())
    assert context_of(obs.usage).context_tokens == 181
    assert billed(obs).context_tokens == 281 + 55096


def test_cache_write_split_survives_a_cumulative_delta_without_it():
    obs = parse(vercel_stream())
    assert obs.model == "claude-sonnet-5"
    assert billed(obs).astuple() == (6, 198, 6289, 3337, 0, 0)
    assert [t.name for t in obs.tool_uses if t.server] == ["bash_code_execution", "bash_code_execution"]


def test_tool_use_input_is_assembled_from_its_fragments():
    obs = parse((SSE / "sdkpy_snapshot_555fb399_0_tool_use_haiku45.sse").read_bytes())
    tool = obs.tool_uses[0]
    assert tool.id == "toolu_018acGYLtfR52q9yDbWaEdQZ"
    assert tool.input == {"location": "San Francisco, CA", "units": "f"}
    assert tool.complete


def test_tool_use_with_an_empty_fragment_has_empty_input():
    obs = parse((SSE / "llm-anthropic_thinking_then_tool_use_haiku45.sse").read_bytes())
    assert obs.tool_uses[0].input == {}


def test_tool_use_cut_off_by_max_tokens_keeps_its_raw_input_and_says_so():
    obs = parse((SSE / "sdkpy_incomplete_partial_json_max_tokens.sse").read_bytes())
    tool = obs.tool_uses[0]
    assert not tool.complete
    assert isinstance(tool.input, str) and tool.input.startswith("{")


def test_thinking_and_text_are_kept():
    obs = parse((SSE / "llm-anthropic_thinking_prompt_sonnet45.sse").read_bytes())
    assert len(obs.thinking[0]) > 50
    assert obs.text


def test_non_ascii_text_is_decoded():
    obs = parse((SSE / "sdkpy_snapshot_555fb399_1_text_haiku45.sse").read_bytes())
    assert "°F" in obs.text


def test_in_stream_error_event_is_recorded():
    stream = (b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-x","usage":'
              b'{"input_tokens":5,"output_tokens":1}}}\n\n'
              b'event: error\ndata: {"type":"error","error":{"details":null,"type":"overloaded_error",'
              b'"message":"Overloaded"},"request_id":"req_1"}\n\n')
    obs = parse(stream)
    assert obs.errors == [{"details": None, "type": "overloaded_error", "message": "Overloaded"}]
    assert billed(obs).input_tokens == 5


def test_crlf_and_cr_line_endings_parse_the_same():
    raw = (SSE / "llm-anthropic_plain_text_sonnet45.sse").read_bytes()
    expected = parse(raw)
    assert parse(raw.replace(b"\n", b"\r\n")) == expected
    assert parse(raw.replace(b"\n", b"\r")) == expected


def test_garbage_never_raises():
    obs = parse(b"data: {not json\n\n\xff\xfe\x00event: x\n\ndata: [1,2]\n\n")
    assert obs.parse_error is None and obs.model is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_any_split_of_the_bytes_gives_the_same_record(name, data):
    raw = (SSE / name).read_bytes()
    whole = parse(raw)
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(raw) - 1), max_size=60))
    assert parse(raw, cuts) == whole


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=10_000), max_size=40),
       crlf=st.booleans())
def test_any_split_of_crlf_streams_gives_the_same_record(cuts, crlf):
    raw = vercel_stream()
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    assert parse(raw, [c % len(raw) for c in cuts if c % len(raw)]) == parse(raw)


def read_json(raw: bytes, cut: int = 10):
    """Feed a JSON body in two pieces; return the observation."""
    observer = JsonObserver()
    observer.feed(raw[:cut])
    observer.feed(raw[cut:])
    return observer.finish()


def test_json_message_is_read():
    recorded = json.loads((JSON / "sdkpy_snapshot_d743d628.json").read_text())
    body = recorded[-1]["response"]["body"]
    obs = read_json(json.dumps(body).encode())
    assert (obs.model, obs.stop_reason) == ("claude-sonnet-4-5-20250929", "end_turn")
    assert billed(obs).astuple() == (406, 50, 0, 0, 0, 0)
    assert obs.text.startswith('{"items"')


def test_json_message_with_cache_read_and_write():
    cassette = yaml.safe_load((JSON / "pydantic-ai_test_anthropic_cache_real_api.cassette.yaml").read_text())
    body = cassette["interactions"][1]["response"]["parsed_body"]
    obs = read_json(json.dumps(body).encode())
    assert billed(obs).astuple() == (3, 33, 1111, 418, 0, 0)


def test_json_error_body_is_recorded_as_an_error():
    observer = JsonObserver()
    observer.feed(b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}')
    assert observer.finish().errors[0]["type"] == "rate_limit_error"


def test_usage_without_split_counts_cache_writes_as_5m():
    assert tokens({"cache_creation_input_tokens": 40}).astuple() == (0, 0, 0, 40, 0, 0)


def test_request_facts_are_read_from_the_body():
    body = json.dumps({
        "model": "claude-opus-4-5", "stream": True, "tools": [{}, {}],
        "metadata": {"user_id": "user_abc_account_def_session_0d6b3e4f-1111-2222-3333-444455556666"},
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True},
                                         {"type": "text", "text": "go on"}]},
        ]}).encode()
    facts = read_request(body, "application/json")
    assert (facts.model, facts.stream, facts.message_count, facts.tool_count) == ("claude-opus-4-5", True, 3, 2)
    assert facts.tool_results == [("t1", True)]
    assert facts.prompt == "go on"
    assert facts.metadata_user_id.endswith("444455556666")


def test_unreadable_request_body_gives_empty_facts():
    assert read_request(b"\xff{", "application/json").model is None


def test_an_exchange_lets_its_body_go_once_read():
    from aspy.proxy import Flight
    from aspy.records import Exchange, Request

    body = json.dumps({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    flight = Flight(Exchange(started_at=0, client=None, provider="p", user="anonymous",
                             request=Request("POST", "/v1/messages", {}, "application/json", len(body))), body)
    ex = flight.ended()
    assert ex.request.facts.model == "claude-haiku-4-5" and ex.request.body_bytes == len(body)
    assert flight.body == b"" and ex.summary()["body_bytes"] == len(body)


def test_one_huge_event_stops_observation_in_linear_time_with_bounded_memory():
    import time

    from aspy.observe import MAX_EVENT
    observer = SseObserver()
    line = b"data: " + b"x" * (10 * 1024 * 1024) + b"\n\n"
    started = time.process_time()
    for i in range(0, len(line), 4096):
        observer.feed(line[i:i + 4096])
        assert len(observer.partial) <= MAX_EVENT + 4096 and observer.data_size <= MAX_EVENT + 4096
    # The old parser re-joined its buffer with every chunk: 24 s for this; linear work takes milliseconds.
    assert time.process_time() - started < 2
    assert "over" in observer.finish().parse_error


def test_a_stream_without_newlines_is_held_only_up_to_the_bound():
    from aspy.observe import MAX_EVENT
    observer = SseObserver()
    for _ in range(3 * MAX_EVENT // 65536):
        observer.feed(b"y" * 65536)
    assert len(observer.partial) == 0 and observer.obs.parse_error


def test_odd_types_in_a_stream_are_read_as_far_as_they_make_sense():
    events = [
        {"type": "message_start", "message": {"id": 5, "model": {"x": 1}, "usage": {"input_tokens": 10**30}}},
        {"type": "content_block_start", "index": [1], "content_block": "no"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": 7, "name": None}},
        {"type": "content_block_delta", "index": 0, "delta": {"partial_json": "{\"a\": \"\\ud800\\u0000\"}"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": ["x"], "usage": {"output_tokens": "3"}},
        {"type": "message_stop"},
    ]
    obs = parse(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events))
    assert obs.parse_error is None and obs.model is None and obs.message_id is None
    assert billed(obs).input_tokens == 10**12 and billed(obs).output_tokens == 0
    assert [(t.id, t.name) for t in obs.tool_uses] == [("", "")]
    assert not obs.unfinished


def test_a_stream_that_ends_without_message_stop_is_unfinished():
    data = (SSE / "sdkpy_snapshot_555fb399_1_text_haiku45.sse").read_bytes()
    cut = data[:data.index(b"event: message_stop")]
    assert parse(cut).unfinished and not parse(data).unfinished


def test_clean_text_replaces_nul_and_lone_surrogates():
    from aspy.records import clean_text
    assert clean_text("a\x00b\ud800c") == "a\ufffdb\ufffdc"
    assert clean_text("plain ☃") == "plain ☃"


def test_deeply_nested_bodies_give_empty_facts_not_errors():
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert read_request(deep, "application/json").model is None
    observer = JsonObserver()
    observer.feed(b'{"type": "message", "content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert "invalid JSON" in observer.finish().parse_error


# Any JSON value, with what tells orjson and json apart: lone surrogates, integers past 64
# bits, NaN and infinities.
event_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)
stream_events = st.fixed_dictionaries({
    "type": st.sampled_from(["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                             "message_delta", "message_stop", "ping", "error", 3]),
}, optional={"index": st.sampled_from([0, 1, 2**64, 1.0, "0"]) | event_values,
             "delta": st.fixed_dictionaries({}, optional={"text": event_values, "partial_json": event_values,
                                                          "stop_reason": event_values}),
             "usage": st.dictionaries(st.sampled_from(["input_tokens", "output_tokens", "cache_read_input_tokens"]),
                                      st.integers() | event_values, max_size=3),
             "content_block": st.fixed_dictionaries({"type": st.sampled_from(["text", "tool_use", "fallback"])},
                                                    optional={"input": event_values, "id": event_values}),
             "message": st.fixed_dictionaries({}, optional={"usage": event_values, "model": event_values})})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(stream_events, max_size=8))
def test_a_stream_reads_the_same_as_with_the_standard_parser(events, monkeypatch):
    raw = b"".join(b"event: e\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events)
    fast = parse(raw)
    with monkeypatch.context() as m:
        m.setattr(observe, "read_event", json.loads)
        standard = parse(raw)
    assert repr(fast) == repr(standard)


def test_a_block_whose_index_is_past_64_bits_keeps_its_text():
    # orjson would make the delta's index a float, and the delta would miss its block.
    index = 2**64
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in [
        {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": "kept"}},
        {"type": "content_block_stop", "index": index}])
    assert parse(raw).text == "kept"
