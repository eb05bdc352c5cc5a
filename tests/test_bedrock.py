"""The Bedrock event stream decoder on the real capture, on any split, and on damaged bytes."""
from __future__ import annotations

import base64
import itertools
import json
import struct
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aspy.bedrock import MAX_FRAME, BedrockDecoder, FrameError, read_headers
from aspy.billing import tokens
from aspy.observe import SseObserver

STREAM = (Path(__file__).resolve().parent / "fixtures" / "real" / "bedrock"
          / "bedrock_sso_proxy_stream-out.bin").read_bytes()


# --- An independent reading and writing of the format, with struct only --------------------

def hand_frames(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a whole stream into (start offset, string headers, payload), checking both CRCs."""
    frames, offset = [], 0
    while offset < len(data):
        total, headers_len, prelude_crc = struct.unpack_from(">III", data, offset)
        assert zlib.crc32(data[offset:offset + 8]) == prelude_crc
        assert zlib.crc32(data[offset:offset + total - 4]) == \
            struct.unpack_from(">I", data, offset + total - 4)[0]
        raw = data[offset + 12:offset + 12 + headers_len]
        headers, pos = {}, 0
        while pos < len(raw):
            name = raw[pos + 1:pos + 1 + raw[pos]].decode()
            pos += 1 + raw[pos]
            assert raw[pos] == 7, "the capture uses string headers only"
            (size,) = struct.unpack_from(">H", raw, pos + 1)
            headers[name] = raw[pos + 3:pos + 3 + size].decode()
            pos += 3 + size
        frames.append((offset, headers, data[offset + 12 + headers_len:offset + total - 4]))
        offset += total
    return frames


def hand_events(data: bytes) -> list[dict]:
    """Decode every chunk frame of a whole stream to its Messages API event."""
    return [json.loads(base64.b64decode(json.loads(payload)["bytes"]))
            for _, _, payload in hand_frames(data)]


def string_header(name: str, value: str) -> bytes:
    """Encode one string header (type 7)."""
    return bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value.encode())) \
        + value.encode()


def encode_frame(headers: dict[str, str], payload: bytes, raw_headers: bytes = b"") -> bytes:
    """Encode one frame with valid CRCs; raw_headers are appended to the string headers."""
    head = b"".join(string_header(k, v) for k, v in headers.items()) + raw_headers
    prelude = struct.pack(">II", 12 + len(head) + len(payload) + 4, len(head))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + payload
    return body + struct.pack(">I", zlib.crc32(body))


def chunk_frame(event: dict, raw_headers: bytes = b"") -> bytes:
    """Encode a Messages API event the way Bedrock does: base64 JSON in a chunk frame."""
    payload = json.dumps({"bytes": base64.b64encode(json.dumps(event).encode()).decode(),
                          "p": "abcdefghij"}).encode()
    return encode_frame({":event-type": "chunk", ":content-type": "application/json",
                         ":message-type": "event"}, payload, raw_headers)


def exception_frame(kind: str, payload: bytes) -> bytes:
    """Encode an exception frame as Bedrock sends one mid-stream."""
    return encode_frame({":exception-type": kind, ":content-type": "application/json",
                         ":message-type": "exception"}, payload)


def decode(data: bytes, cuts: list[int] | None = None,
           decoder: BedrockDecoder | None = None) -> tuple[list[dict], BedrockDecoder]:
    """Feed a stream whole or cut at the given offsets, then finish; return events and decoder."""
    decoder = decoder or BedrockDecoder()
    points = [0, *sorted({c for c in cuts or [] if 0 < c < len(data)}), len(data)]
    events: list[dict] = []
    for start, end in itertools.pairwise(points):
        events += decoder.feed(data[start:end])
        assert decoder.buffered <= max(decoder.max_frame, 12)
    decoder.finish()
    return events, decoder


FRAMES = hand_frames(STREAM)
STARTS = [start for start, _, _ in FRAMES]
THROTTLE = exception_frame("throttlingException",
                           b'{"message":"Too many requests, please wait before trying again."}')


# --- The real capture ---------------------------------------------------------------------

def test_real_stream_decodes_to_the_events_it_wraps() -> None:
    events, decoder = decode(STREAM)
    assert events == hand_events(STREAM)
    assert decoder.error is None and decoder.buffered == 0
    assert decoder.frames == len(FRAMES) == 120 and decoder.skipped == 0
    assert [e["type"] for e in events] == (["message_start", "content_block_start"]
                                           + ["content_block_delta"] * 115
                                           + ["content_block_stop", "message_delta", "message_stop"])
    message = events[0]["message"]
    assert message["id"] == "msg_bdrk_01Cvb6nyDr4qNiwfcJMF8njo"
    assert message["model"] == "claude-sonnet-4-20250514"
    assert message["usage"] == {"input_tokens": 17, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0, "output_tokens": 3}
    assert events[-2] == {"type": "message_delta", "usage": {"output_tokens": 322},
                          "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert len(text) == 1558 and text.startswith("Hello! Cache tokens")


def test_real_stream_exposes_bedrock_invocation_metrics_as_usage() -> None:
    events, decoder = decode(STREAM)
    metrics = {"inputTokenCount": 17, "outputTokenCount": 322,
               "invocationLatency": 7881, "firstByteLatency": 1145}
    assert events[-1]["amazon-bedrock-invocationMetrics"] == metrics
    assert decoder.invocation_metrics == metrics
    assert decoder.metrics_usage() == {"input_tokens": 17, "output_tokens": 322}


def test_real_stream_events_read_by_the_sse_observer_give_the_billed_usage() -> None:
    events, _ = decode(STREAM)
    observer = SseObserver()
    observer.feed(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events))
    obs = observer.finish()
    assert (obs.model, obs.stop_reason, obs.message_id) == \
        ("claude-sonnet-4-20250514", "end_turn", "msg_bdrk_01Cvb6nyDr4qNiwfcJMF8njo")
    assert tokens(obs.usage).astuple() == (17, 322, 0, 0, 0, 0)
    assert len(obs.text) == 1558


# --- Any split ----------------------------------------------------------------------------

MIXED = STREAM[:STARTS[5]] + THROTTLE + STREAM[STARTS[5]:]
WHOLE_EVENTS, WHOLE = decode(MIXED)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=len(MIXED)), max_size=300))
def test_any_split_of_the_bytes_gives_the_same_events(cuts: list[int]) -> None:
    events, decoder = decode(MIXED, cuts)
    assert events == WHOLE_EVENTS
    assert decoder.invocation_metrics == WHOLE.invocation_metrics
    assert decoder.error is None and decoder.buffered == 0


def test_one_byte_chunks_give_the_same_events() -> None:
    events, decoder = decode(MIXED, list(range(len(MIXED))))
    assert events == WHOLE_EVENTS and len(events) == 121
    assert decoder.error is None


# --- Damaged streams ----------------------------------------------------------------------

def frame_index(offset: int) -> int:
    """Return the index of the capture frame holding a byte."""
    return max(i for i, start in enumerate(STARTS) if start <= offset)


def test_corrupted_message_crc_stops_at_that_frame() -> None:
    damaged = bytearray(STREAM)
    end_of_third = STARTS[3] - 1
    damaged[end_of_third] ^= 0x01
    events, decoder = decode(bytes(damaged))
    assert events == hand_events(STREAM)[:2]
    assert decoder.error is not None and "message CRC mismatch" in decoder.error
    assert f"at byte {STARTS[2]}" in decoder.error and decoder.buffered == 0


def test_corrupted_prelude_crc_stops_at_that_frame() -> None:
    damaged = bytearray(STREAM)
    damaged[STARTS[7] + 9] ^= 0xFF
    events, decoder = decode(bytes(damaged))
    assert len(events) == 7 and decoder.error is not None and "prelude CRC" in decoder.error


@settings(max_examples=120, deadline=None)
@given(st.integers(min_value=0, max_value=len(STREAM) - 1), st.integers(min_value=1, max_value=255),
       st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_changed_byte_is_caught_at_its_frame(position: int, flip: int, cuts: list[int]) -> None:
    damaged = bytearray(STREAM)
    damaged[position] ^= flip
    events, decoder = decode(bytes(damaged), cuts)
    # CRC32 catches every error confined to one byte, so nothing damaged gets through.
    assert events == hand_events(STREAM)[:frame_index(position)]
    assert decoder.error is not None and decoder.buffered == 0


@settings(max_examples=120, deadline=None)
@given(st.integers(min_value=1, max_value=len(STREAM) - 1),
       st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_a_truncated_stream_is_reported_when_it_ends(length: int, cuts: list[int]) -> None:
    events, decoder = decode(STREAM[:length], cuts)
    complete = sum(1 for start, _, _ in FRAMES if start < length) - (0 if length in STARTS else 1)
    assert events == hand_events(STREAM)[:complete]
    if length in STARTS:
        assert decoder.error is None
    else:
        assert decoder.error is not None and "stream ended inside a frame" in decoder.error
    assert decoder.buffered == 0


def prelude(total: int, headers_len: int) -> bytes:
    """Encode a prelude with a correct CRC, whatever lengths it claims."""
    head = struct.pack(">II", total, headers_len)
    return head + struct.pack(">I", zlib.crc32(head))


def test_a_frame_claiming_100_mb_is_refused_without_buffering_it() -> None:
    decoder = BedrockDecoder()
    assert decoder.feed(STREAM[:STARTS[1]]) != []
    assert decoder.feed(prelude(100 * 1024 * 1024, 0)) == []
    assert decoder.error is not None and "exceeds the 16777216-byte bound" in decoder.error
    for _ in range(5):
        assert decoder.feed(b"\0" * 1024 * 1024) == []
        assert decoder.buffered == 0


def test_a_stopped_decoder_returns_nothing_more() -> None:
    decoder = BedrockDecoder()
    decoder.feed(b"\0" * 16)
    assert decoder.error is not None
    assert decoder.feed(STREAM) == [] and decoder.buffered == 0 and decoder.frames == 0


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0, max_value=4096), max_size=30))
def test_random_garbage_never_raises_and_stays_bounded(garbage: bytes, cuts: list[int]) -> None:
    events, decoder = decode(garbage, cuts, BedrockDecoder(max_frame=1024))
    assert events == []
    if garbage:
        assert decoder.error is not None
    assert decoder.buffered == 0


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=2**32 - 1),
       st.binary(max_size=2048), st.lists(st.integers(min_value=0, max_value=2060), max_size=30))
def test_any_claimed_lengths_never_raise_nor_buffer_past_the_bound(
        total: int, headers_len: int, rest: bytes, cuts: list[int]) -> None:
    events, decoder = decode(prelude(total, headers_len) + rest, cuts, BedrockDecoder(max_frame=1024))
    assert events == [] and decoder.error is not None and decoder.buffered == 0
    if total > 1024:
        assert "bound" in decoder.error


# --- Frames that are not plain chunks -----------------------------------------------------

def test_an_exception_frame_becomes_an_error_event() -> None:
    events, decoder = decode(STREAM[:STARTS[3]] + THROTTLE)
    assert events[-1] == {"type": "error", "error": {
        "type": "throttlingException",
        "message": "Too many requests, please wait before trying again."}}
    assert decoder.error is None and decoder.skipped == 0


def test_a_model_stream_error_keeps_its_message_and_decoding_goes_on() -> None:
    failure = exception_frame("modelStreamErrorException",
                              b'{"message":"Model stream failed","originalStatusCode":500}')
    events, decoder = decode(failure + exception_frame("internalServerException", b"not json")
                             + STREAM[:STARTS[1]])
    assert [e.get("error") for e in events[:2]] == [
        {"type": "modelStreamErrorException", "message": "Model stream failed"},
        {"type": "internalServerException", "message": "not json"}]
    assert events[2]["type"] == "message_start" and decoder.error is None


def test_a_protocol_error_frame_becomes_an_error_event() -> None:
    frame = encode_frame({":message-type": "error", ":error-code": "InternalFailure",
                          ":error-message": "service unavailable"}, b"")
    events, _ = decode(frame)
    assert events == [{"type": "error", "error": {"type": "InternalFailure",
                                                  "message": "service unavailable"}}]


def test_frames_without_a_readable_event_are_skipped_not_fatal() -> None:
    junk = [encode_frame({":message-type": "event", ":event-type": "initial-response"}, b"{}"),
            encode_frame({":message-type": "event", ":event-type": "chunk"}, b"not json"),
            encode_frame({":message-type": "event", ":event-type": "chunk"}, b'{"bytes":"%%%"}'),
            encode_frame({":message-type": "event", ":event-type": "chunk"},
                         b'{"bytes":"' + base64.b64encode(b"[1, 2]") + b'"}'),
            encode_frame({":message-type": "surprise"}, b"")]
    events, decoder = decode(b"".join(junk) + STREAM[:STARTS[1]])
    assert [e["type"] for e in events] == ["message_start"]
    assert decoder.error is None and decoder.frames == 6 and decoder.skipped == 5


def test_headers_of_every_value_type_are_read_and_skipped_correctly() -> None:
    uid = bytes(range(16))
    raw = (b"\x01a\x00" + b"\x01b\x01" + b"\x01c\x02\xff" + b"\x01d\x03" + struct.pack(">h", -2)
           + b"\x01e\x04" + struct.pack(">i", 70000) + b"\x01f\x05" + struct.pack(">q", -(2**40))
           + b"\x01g\x06\x00\x03\x00\x01\x02" + b"\x01h\x07\x00\x02hi"
           + b"\x01i\x08" + struct.pack(">q", 1_700_000_000_000) + b"\x01j\x09" + uid)
    assert read_headers(raw) == {"a": True, "b": False, "c": -1, "d": -2, "e": 70000, "f": -(2**40),
                                 "g": b"\x00\x01\x02", "h": "hi", "i": 1_700_000_000_000,
                                 "j": "00010203-0405-0607-0809-0a0b0c0d0e0f"}
    events, decoder = decode(chunk_frame({"type": "ping"}, raw))
    assert events == [{"type": "ping"}] and decoder.error is None


@pytest.mark.parametrize("raw", [b"\x01a\x0a", b"\x05ab", b"\x01a\x07\x00\x09hi", b"\x01a\x04\x00"])
def test_headers_that_do_not_parse_are_a_framing_error(raw: bytes) -> None:
    with pytest.raises(FrameError):
        read_headers(raw)
    events, decoder = decode(chunk_frame({"type": "ping"}, raw) + STREAM)
    assert events == [] and decoder.error is not None and decoder.buffered == 0


def test_metrics_with_cache_counts_become_messages_usage() -> None:
    metrics = {"inputTokenCount": 4, "outputTokenCount": 90, "invocationLatency": 1200,
               "firstByteLatency": 300, "cacheReadInputTokenCount": 5000,
               "cacheWriteInputTokenCount": 800}
    _, decoder = decode(chunk_frame({"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics}))
    assert decoder.invocation_metrics == metrics
    assert decoder.metrics_usage() == {"input_tokens": 4, "output_tokens": 90,
                                       "cache_read_input_tokens": 5000,
                                       "cache_creation_input_tokens": 800}


def test_no_metrics_means_no_metrics_usage() -> None:
    _, decoder = decode(STREAM[:STARTS[-1]])
    assert decoder.invocation_metrics is None and decoder.metrics_usage() is None


# --- Linear time --------------------------------------------------------------------------

def feed_in_kib_chunks(data: bytes) -> tuple[list[dict], BedrockDecoder, float]:
    """Feed a stream 1 KiB at a time; return the events, the decoder and the seconds it took."""
    decoder = BedrockDecoder()
    events: list[dict] = []
    started = time.perf_counter()
    for start in range(0, len(data), 1024):
        events += decoder.feed(data[start:start + 1024])
    decoder.finish()
    return events, decoder, time.perf_counter() - started


def big_frame(megabytes: int) -> tuple[dict, bytes]:
    """Return one text delta event and its chunk frame of about the given size."""
    # base64 grows the text by 4/3; the frame stays under the 16 MiB bound.
    event = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "x" * (megabytes * 1024 * 1024 * 3 // 4)}}
    data = chunk_frame(event)
    assert (megabytes - 1) * 1024 * 1024 < len(data) < MAX_FRAME
    return event, data


def test_one_5_mb_frame_fed_in_1_kib_chunks_takes_well_under_a_second() -> None:
    event, data = big_frame(5)
    events, decoder, seconds = feed_in_kib_chunks(data)
    assert events == [event] and decoder.error is None
    # Linear decoding takes a few hundredths of a second here.
    assert seconds < 1.0


def test_one_15_mb_frame_fed_in_1_kib_chunks_takes_linear_time() -> None:
    # Copying the buffer on every feed would move ~115 GB here (many seconds); linear ~30 MB.
    event, data = big_frame(15)
    events, decoder, seconds = feed_in_kib_chunks(data)
    assert events == [event] and decoder.error is None
    assert seconds < 3.0


def test_5_mb_of_real_frames_fed_in_1_kib_chunks_takes_linear_time() -> None:
    copies = 5 * 1024 * 1024 // len(STREAM) + 1
    events, decoder, seconds = feed_in_kib_chunks(STREAM * copies)
    assert len(events) == 120 * copies and decoder.error is None
    assert seconds < 10.0
