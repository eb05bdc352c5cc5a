"""The sessions module in-process: keys, context rules, event buffers and retention."""
from __future__ import annotations

import json
import time

import pytest

from aspy.accounting import warning_level
from aspy.sessions import session_key
from aspy.store import Horizon, Scope
from helpers import book, exchange


@pytest.mark.parametrize("pct,level", [(0, "normal"), (69.99, "normal"), (70, "warning"), (84.99, "warning"),
                                       (85, "high"), (94.99, "high"), (95, "critical"), (120, "critical")])
def test_warning_levels_follow_the_thresholds(pct, level):
    assert warning_level(pct) == level


def test_session_key_order_and_metadata_forms():
    assert session_key(exchange("a", **{"x-session-id": "b"})) == ("a", "claude_code")
    assert session_key(exchange(None, **{"x-session-id": "b"})) == ("b", "header")
    assert session_key(exchange(None, metadata=json.dumps({"session_id": "c"}))) == ("c", "metadata")
    sid = "0d6b3e4f-1111-2222-3333-444455556666"
    assert session_key(exchange(None, metadata=f"user_{'ab' * 32}_account_{sid}_session_{sid}")) == (sid, "metadata")
    assert session_key(exchange(None, metadata="something else")) == (None, None)


@pytest.mark.parametrize("before,after,compacted", [
    (10_000, 1_000, False),    # from 10,000 or less: never a compaction
    (10_001, 7_000, True),     # below 70 % of the previous value
    (20_000, 14_000, False),   # exactly 70 % is not below it
    (20_000, 13_999, True),
])
def test_a_compaction_is_a_drop_below_70_percent_from_above_10000(tmp_path, before, after, compacted):
    sessions = book(tmp_path)
    sessions.record([exchange(input_tokens=before)])
    sessions.record([exchange(input_tokens=after)])
    [s] = sessions.store.sessions(Scope(), None, Horizon(0, 0), 5)
    assert s.compactions == (1 if compacted else 0) and s.context_tokens == after
    events = sessions.store.events(Scope(), ["context_compact"], None, 5)
    assert len(events) == (1 if compacted else 0)


def test_subagent_requests_count_but_leave_the_gauge(tmp_path):
    sessions = book(tmp_path)
    sessions.record([exchange(input_tokens=50_000), exchange(input_tokens=500, agent="sub-1")])
    [s] = sessions.store.sessions(Scope(), None, Horizon(0, 0), 5)
    assert s.requests == 2 and s.usage.input_tokens == 50_500
    assert s.context_tokens == 50_000 and s.compactions == 0


def test_each_session_keeps_only_its_last_events(tmp_path):
    sessions = book(tmp_path, events_per_session=5)
    sessions.record([exchange() for _ in range(4)])
    sessions.record([exchange("other")])
    assert len(sessions.store.events(Scope(session="s1"), [], None, 500)) > 5
    sessions.upkeep()  # the writer runs it every few seconds; run it now
    sessions.record([exchange("other")])
    kept = sessions.store.events(Scope(session="s1"), [], None, 500)
    assert len(kept) == 5
    assert kept[0].type == "response"  # the newest survive
    [s] = sessions.store.sessions(Scope(session="s1"), None, Horizon(0, 0), 5)
    assert s.requests == 4  # statistics are never trimmed


def test_events_and_text_older_than_the_retention_are_removed(tmp_path):
    sessions = book(tmp_path)
    old = time.time() - 2 * 86400
    sessions.record([exchange("old", at=old)])
    sessions.record([exchange("new")])
    sessions.upkeep()
    assert sessions.store.events(Scope(session="old"), [], None, 50) == []
    assert sessions.store.events(Scope(session="new"), [], None, 50)
    assert sessions.store.get_session("old").requests == 1


def test_a_tool_result_without_a_known_call_is_ignored(tmp_path):
    sessions = book(tmp_path)
    ex = exchange()
    ex.request.facts.tool_results = [("toolu_unknown", True)]
    sessions.record([ex])
    [s] = sessions.store.sessions(Scope(), None, Horizon(0, 0), 5)
    assert s.tool_failed == 0
    assert sessions.store.events(Scope(), ["tool_result"], None, 5) == []


def test_traffic_after_end_after_opens_a_new_session_even_before_the_upkeep(tmp_path):
    sessions = book(tmp_path, idle_after="1s", end_after="2s")
    sessions.record([exchange(at=time.time() - 10)])
    # The upkeep has not run since.
    sessions.record([exchange()])
    found = sessions.store.sessions(Scope(session="s1"), None, Horizon(0, 0), 10)
    assert len(found) == 2 and [s.requests for s in found] == [1, 1]


def test_a_large_tool_input_is_kept_only_in_part_in_its_event(tmp_path):
    sessions = book(tmp_path)
    ex = exchange()
    from aspy.records import ToolUse
    ex.observation.tool_uses = [ToolUse("toolu_big", "Write", {"content": "x" * 5_000_000}),
                                ToolUse("toolu_small", "Read", {"file_path": "/a"})]
    sessions.record([ex])
    events = {e.data["tool_use_id"]: e.data["input"] for e in sessions.store.events(Scope(), ["tool_call"], None, 5)}
    assert events["toolu_small"] == {"file_path": "/a"}
    assert isinstance(events["toolu_big"], str) and len(events["toolu_big"]) < 17_000
    assert events["toolu_big"].endswith("(5000014 characters in all)")
