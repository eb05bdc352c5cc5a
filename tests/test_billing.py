"""aspy bills what Anthropic bills, end to end: fake upstream, aspy under gunicorn, /api/stats.

Every expected figure is computed here from the rates Anthropic documents (quoted with their
page), never from aspy's model table; docs/pricing.md cites the same sources.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import requests

from aspy.store import Horizon, Scope
from helpers import API_KEY, AspyProcess, eventually, send_message, standard_config, stats_when

M = 1e6
# https://platform.claude.com/docs/en/about-claude/pricing: "5-minute cache write tokens are 1.25 times
# the base input tokens price, 1-hour cache write tokens are 2 times, cache read tokens are 0.1 times".
FIVE_MIN, ONE_HOUR, READ = 1.25, 2.0, 0.1
# Base input and output per million tokens, from the pricing page and each model's overview page.
SONNET_4_6 = (3, 15)
SONNET_4_5 = (3, 15)
OPUS_5 = (5, 25)
OPUS_4_8 = (5, 25)
OPUS_4_6 = (5, 25)
HAIKU_4_5 = (1, 5)
FABLE_5_2 = (8, 40)          # cache reads at 0.025x (Fable footnote)
FABLE_5 = (10, 50)
# Fast mode pricing: "Claude Opus 5 / Claude Opus 4.8 | $10 / MTok | $50 / MTok", Opus 5.5 $8 / $40;
# "Prompt caching multipliers apply on top of fast mode pricing".
OPUS_5_FAST = (10, 50)
OPUS_5_5_FAST = (8, 40)      # cache reads at 0.05x (Opus 5.5 footnote)
# Haiku 5.5: $0.10 / $0.50 up to 100K prompt tokens, $0.50 / $2.50 over; cache reads 0.01 / 0.05.
HAIKU_5_5, HAIKU_5_5_LONG = (0.10, 0.50), (0.50, 2.50)
# Sonnet 4.5 over 200K: "Input: $3 → $6 / MTok | Output: $15 → $22.50 / MTok".
GEO_US = 1.1                 # "a 1.1x multiplier on all token pricing categories"
BATCH = 0.5                  # "All usage is charged at 50% of the standard API prices"


def price(rates: tuple[float, float], i: int = 0, o: int = 0, read: int = 0, w5: int = 0, w1: int = 0,
          read_multiplier: float = READ) -> float:
    """Price tokens from base input and output rates and the documented cache multipliers."""
    base_in, base_out = rates
    return (i * base_in + o * base_out + w5 * base_in * FIVE_MIN + w1 * base_in * ONE_HOUR
            + read * base_in * read_multiplier) / M


CLIENT = '\n[clients.bill]\nname = "Billing"\nprovider = "fake"\n'


@pytest.fixture(scope="module")
def billing(upstream, tmp_path_factory):
    server = AspyProcess(tmp_path_factory.mktemp("billing"), standard_config(upstream.url, CLIENT)).start()
    yield server
    server.stop()


def send(server, model: str, usage: dict, stream: bool = True, body: dict | None = None, **headers) -> str:
    """Send one turn answered with this usage; return its session key."""
    session = str(uuid.uuid4())
    r = send_message(server, "bill", "bill me", model, stream, body=body, max_tokens=64, headers={
        "x-claude-code-session-id": session, "x-fake-usage": json.dumps(usage), **headers})
    assert r.status_code == 200
    return session


def stats(server, session: str, requests_total: int = 1) -> dict:
    """Return /api/stats of one session once its exchanges are recorded."""
    return stats_when(server, requests_total, session=session)


@pytest.mark.parametrize("model,rates,read", [("claude-fable-5-2", FABLE_5_2, 0.025),
                                               ("claude-mythos-5-2", FABLE_5_2, 0.025)])
def test_the_november_models_are_priced(billing, model, rates, read):
    usage = {"input_tokens": 1_000, "output_tokens": 2_000, "cache_read_input_tokens": 50_000,
             "cache_creation_input_tokens": 4_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 3_000, "ephemeral_1h_input_tokens": 1_000}}
    cost = stats(billing, send(billing, model, usage))["cost"]
    expected = price(rates, 1_000, 2_000, read=50_000, w5=3_000, w1=1_000, read_multiplier=read)
    assert cost["total_usd"] == pytest.approx(expected, abs=1e-9) and cost["unpriced_models"] == []


@pytest.mark.parametrize("model,fast,read", [("claude-opus-5", OPUS_5_FAST, READ),
                                              ("claude-opus-4-8", OPUS_5_FAST, READ),
                                              ("claude-opus-5-5", OPUS_5_5_FAST, 0.05)])
def test_fast_mode_is_billed_at_fast_rates_with_cache_multipliers_on_top(billing, model, fast, read):
    usage = {"input_tokens": 2_000, "output_tokens": 1_000, "cache_read_input_tokens": 30_000,
             "cache_creation_input_tokens": 5_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 4_000, "ephemeral_1h_input_tokens": 1_000},
             "speed": "fast"}
    cost = stats(billing, send(billing, model, usage))["cost"]
    expected = price(fast, 2_000, 1_000, read=30_000, w5=4_000, w1=1_000, read_multiplier=read)
    assert cost["total_usd"] == pytest.approx(expected, abs=1e-9)


def test_us_only_inference_costs_1_1x_on_every_token_category(billing):
    usage = {"input_tokens": 10_000, "output_tokens": 3_000, "cache_read_input_tokens": 100_000,
             "cache_creation_input_tokens": 2_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 1_500, "ephemeral_1h_input_tokens": 500},
             "inference_geo": "us"}
    cost = stats(billing, send(billing, "claude-sonnet-4-6", usage))["cost"]
    expected = GEO_US * price(SONNET_4_6, 10_000, 3_000, read=100_000, w5=1_500, w1=500)
    assert cost["total_usd"] == pytest.approx(expected, abs=1e-9)
    global_usage = usage | {"inference_geo": "global"}
    plain = stats(billing, send(billing, "claude-sonnet-4-6", global_usage))["cost"]["total_usd"]
    assert plain == pytest.approx(expected / GEO_US, abs=1e-9)


def test_advisor_iterations_are_billed_at_the_advisor_models_rates_and_share(billing):
    # The advisor tool page's example: executor iterations at the executor's rates, the advisor's at its own;
    # top-level usage holds the executor's tokens only.
    usage = {"input_tokens": 1_760, "cache_read_input_tokens": 412, "cache_creation_input_tokens": 0,
             "output_tokens": 531, "iterations": [
                 {"type": "message", "input_tokens": 412, "cache_read_input_tokens": 0,
                  "cache_creation_input_tokens": 0, "output_tokens": 89},
                 {"type": "advisor_message", "model": "claude-opus-5", "input_tokens": 823,
                  "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 1_612},
                 {"type": "message", "input_tokens": 1_348, "cache_read_input_tokens": 412,
                  "cache_creation_input_tokens": 0, "output_tokens": 442}]}
    found = stats(billing, send(billing, "claude-sonnet-4-6", usage))
    executor = price(SONNET_4_6, 412 + 1_348, 89 + 442, read=412)
    advisor = price(OPUS_5, 823, 1_612)
    assert found["cost"]["by_model"] == {"claude-opus-5": pytest.approx(advisor, abs=1e-9),
                                         "claude-sonnet-4-6": pytest.approx(executor, abs=1e-9)}
    assert found["cost"]["total_usd"] == pytest.approx(executor + advisor, abs=1e-9)
    assert found["tokens"]["input"] == 412 + 823 + 1_348 and found["tokens"]["output"] == 89 + 1_612 + 442


def test_fallback_iterations_are_billed_at_the_model_that_served_and_a_declined_hop_is_free(billing):
    # refusals-and-fallback page: the declined model appears as a `message` entry, the serving model as
    # `fallback_message`; top-level usage is the serving hop's. Refused before output: not billed.
    usage = {"input_tokens": 412, "output_tokens": 264, "iterations": [
        {"type": "message", "model": "claude-fable-5", "input_tokens": 535, "output_tokens": 0,
         "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
        {"type": "fallback_message", "model": "claude-opus-4-8", "input_tokens": 412, "output_tokens": 264,
         "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}]}
    found = stats(billing, send(billing, "claude-fable-5", usage))
    assert found["cost"]["total_usd"] == pytest.approx(price(OPUS_4_8, 412, 264), abs=1e-9)
    assert found["cost"]["by_model"]["claude-opus-4-8"] == pytest.approx(price(OPUS_4_8, 412, 264), abs=1e-9)
    assert found["cost"]["by_model"].get("claude-fable-5", 0) == 0


def test_a_refusal_before_any_output_is_not_billed_but_its_tokens_are_shown(billing):
    usage = {"input_tokens": 412, "output_tokens": 0}
    found = stats(billing, send(billing, "claude-fable-5", usage, **{"x-fake-refusal": "before"}))
    assert found["cost"]["total_usd"] == 0 and found["tokens"]["input"] == 412
    # "A mid-stream refusal bills the input tokens and the output already streamed at normal rates."
    late = stats(billing, send(billing, "claude-fable-5", {"input_tokens": 412, "output_tokens": 20},
                               **{"x-fake-refusal": "after"}))
    assert late["cost"]["total_usd"] == pytest.approx(price(FABLE_5, 412, 20), abs=1e-9)


def test_the_long_context_band_applies_per_sampling_never_to_a_loops_sum(billing):
    # Two samplings of a server-tool loop, each under Haiku 5.5's 100K band, 130K together.
    iterations = [{"type": "message", "input_tokens": 60_000, "output_tokens": 500},
                  {"type": "message", "input_tokens": 70_000, "output_tokens": 700}]
    usage = {"input_tokens": 130_000, "output_tokens": 1_200, "iterations": iterations,
             "server_tool_use": {"web_search_requests": 1}}
    found = stats(billing, send(billing, "claude-haiku-5-5", usage))
    assert found["cost"]["total_usd"] == pytest.approx(price(HAIKU_5_5, 130_000, 1_200) + 10 / 1000, abs=1e-9)
    # One sampling over the band is priced in it, the other not.
    over = {"input_tokens": 180_000, "output_tokens": 1_200, "iterations": [
        {"type": "message", "input_tokens": 60_000, "output_tokens": 500},
        {"type": "message", "input_tokens": 120_000, "output_tokens": 700}]}
    found = stats(billing, send(billing, "claude-haiku-5-5", over))
    expected = price(HAIKU_5_5, 60_000, 500) + price(HAIKU_5_5_LONG, 120_000, 700)
    assert found["cost"]["total_usd"] == pytest.approx(expected, abs=1e-9)
    # Sonnet 4.5: two 150K samplings are 300K together, both under its 200K band.
    sonnet = {"input_tokens": 300_000, "output_tokens": 2_000, "iterations": [
        {"type": "message", "input_tokens": 150_000, "output_tokens": 1_000},
        {"type": "message", "input_tokens": 150_000, "output_tokens": 1_000}]}
    found = stats(billing, send(billing, "claude-sonnet-4-5", sonnet))
    assert found["cost"]["total_usd"] == pytest.approx(price(SONNET_4_5, 300_000, 2_000), abs=1e-9)


def test_a_loop_reported_without_iterations_takes_its_band_from_the_first_sampling(billing):
    # message_start carries the first sampling's prompt (60K); message_delta the loop's sum (130K).
    found = stats(billing, send(billing, "claude-haiku-5-5", {"input_tokens": 60_000, "output_tokens": 900},
                                **{"x-fake-delta-usage": json.dumps({
                                    "input_tokens": 130_000, "server_tool_use": {"web_search_requests": 1}})}))
    assert found["cost"]["total_usd"] == pytest.approx(price(HAIKU_5_5, 130_000, 900) + 10 / 1000, abs=1e-9)


def test_message_batches_results_are_billed_at_half_price_once(billing):
    batch = f"msgbatch_{uuid.uuid4().hex[:12]}"
    session = str(uuid.uuid4())

    def download():
        r = requests.get(f"{billing.url}/bill/v1/messages/batches/{batch}/results", headers={
            "x-api-key": API_KEY, "x-claude-code-session-id": session,
            "x-fake-file": "../constructed/batch_results.jsonl", "x-fake-content-type": "application/binary"})
        assert r.status_code == 200 and r.content.count(b"\n") == 4

    download()
    found = stats(billing, session)
    opus = BATCH * price(OPUS_4_6, 1_000, 340, read=20_000, w1=500)
    haiku = BATCH * price(HAIKU_4_5, 2_000, 100)
    assert found["cost"]["by_model"] == {"claude-haiku-4-5-20251001": pytest.approx(haiku, abs=1e-9),
                                         "claude-opus-4-6": pytest.approx(opus, abs=1e-9)}
    # Downloading the same results again bills nothing more.
    download()
    again = stats(billing, session, requests_total=2)
    assert again["cost"]["total_usd"] == pytest.approx(opus + haiku, abs=1e-9)


def test_cache_writes_that_grow_without_a_split_take_the_requests_ttl(billing):
    body = {"system": [{"type": "text", "text": "long instructions",
                        "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}
    start = {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 1_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1_000}}
    found = stats(billing, send(billing, "claude-sonnet-4-6", start, body=body,
                                **{"x-fake-delta-usage": json.dumps({"cache_creation_input_tokens": 3_000})}))
    assert found["tokens"]["cache_write_1h"] == 3_000 and found["tokens"]["cache_write_5m"] == 0
    assert found["cost"]["total_usd"] == pytest.approx(price(SONNET_4_6, 10, 5, w1=3_000), abs=1e-9)


def test_the_unpriced_history_is_priced_once_the_table_learns_the_model(start_aspy, upstream, tmp_path):
    config = standard_config(upstream.url, CLIENT)
    server = start_aspy(config)
    session = send(server, "claude-in-house-9", {"input_tokens": 1_000, "output_tokens": 100})
    send(server, "claude-in-house-9", {"input_tokens": 10, "output_tokens": 1})
    found = stats(server, session)
    assert found["cost"]["total_usd"] == 0 and found["cost"]["unpriced_models"] == ["claude-in-house-9"]
    # Wherever cost is shown, the user is told: the event, the log (once), aspy check and aspy models.
    [event] = requests.get(f"{server.url}/api/events", params={"session": session, "type": "response"}).json()["events"]
    assert event["cost_usd"] == 0 and event["unpriced_models"] == ["claude-in-house-9"]
    told = [line for line in server.log_text().splitlines() if "no price for model 'claude-in-house-9'" in line]
    assert 1 <= len(told) <= 2  # once per worker process, never per request
    env = {**server.env, "PATH": os.environ["PATH"]}
    check = subprocess.run([sys.executable, "-m", "aspy", "check", "--config", str(server.config)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert "no price for claude-in-house-9" in check.stderr
    listed = subprocess.run([sys.executable, "-m", "aspy", "models", "--config", str(server.config), "--json"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(listed.stdout)["unpriced_models_seen"] == ["claude-in-house-9"]
    server.stop()
    # The table learns the model: a models.yaml beside config.toml. No traffic is sent again.
    (tmp_path / "models.yaml").write_text(
        "models:\n  claude-in-house-9: {input: 7, output: 21, cache_write_5m: 8.75, cache_write_1h: 14, "
        "cache_read: 0.7, context_window: 100000, source: 'our own deployment', taken: '2026-11-22'}\n")
    server.start()
    found = eventually(lambda: (s := stats(server, session))["cost"]["total_usd"] > 0 and s)
    assert found["cost"]["total_usd"] == pytest.approx(price((7, 21), 1_000, 100), abs=1e-9)
    assert found["cost"]["unpriced_models"] == []
    listed = subprocess.run([sys.executable, "-m", "aspy", "models", "--config", str(server.config), "--json"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(listed.stdout)["unpriced_models_seen"] == []


def test_aspy_top_says_which_models_have_no_price():
    from rich.console import Console

    from aspy.top import Snapshot, render
    stats = {"requests": {"total": 1, "failed": 0}, "tools": {"total_calls": 0, "failed_calls": 0},
             "tokens": {"input": 5, "output": 1, "cache_read": 0, "cache_write_5m": 0, "cache_write_1h": 0},
             "cost": {"total_usd": 0.0, "savings_usd": 0.0, "by_model": {}, "unpriced_models": ["claude-new-1"]},
             "sessions": {"active": 1, "idle": 0, "ended": 0}}
    console = Console(record=True, width=120)
    console.print(render(Snapshot(stats=stats, clients=[], sessions=[], events=[], at=0), "http://x", None, None))
    assert "No price for claude-new-1" in console.export_text()


# The same rules in-process, where a case needs a table swapped or a shape the fake cannot send.

def test_a_share_priced_in_part_is_repriced_exactly_once(tmp_path):
    from aspy.models import load_models
    from helpers import book, exchange

    (tmp_path / "models.yaml").write_text(
        "models:\n  claude-in-house-8: {input: 2, output: 4, cache_write_5m: 2.5, cache_write_1h: 4, "
        "cache_read: 0.2, context_window: 100000, source: test, taken: '2026-11-22'}\n")
    old = book(tmp_path)
    unpriced = exchange(input_tokens=1_000)
    unpriced.observation.model = "claude-in-house-8"
    old.record([unpriced])
    # A worker on the new table records into the same share before any upkeep has run.
    new = book(tmp_path)
    new.models = load_models(tmp_path)
    priced = exchange(input_tokens=3_000)
    priced.observation.model = "claude-in-house-8"
    new.record([priced])
    new.upkeep()
    new.upkeep()
    [session] = new.store.sessions(Scope(), None, Horizon(0, 0), 5)
    assert session.cost_usd == pytest.approx(price((2, 4), 4_000, 2), abs=1e-12)
    assert session.by_model["claude-in-house-8"].priced


def test_a_served_fallback_counts_for_the_serving_model_with_its_searches():
    from aspy.billing import answering, samplings
    usage = {"input_tokens": 412, "output_tokens": 264, "server_tool_use": {"web_search_requests": 3},
             "iterations": [{"type": "message", "model": "claude-fable-5", "input_tokens": 535, "output_tokens": 0},
                            {"type": "fallback_message", "model": "claude-opus-4-8", "input_tokens": 412,
                             "output_tokens": 264}]}
    parts = samplings(usage, "claude-fable-5")
    served = parts[answering(parts)]
    assert served.model == "claude-opus-4-8" and served.billed and served.usage.web_search_requests == 3
    assert not parts[0].billed and parts[0].usage.web_search_requests == 0


def test_steps_that_name_no_model_ran_on_the_serving_model():
    from aspy.billing import samplings
    # Streaming: message_start named the model asked for; the steps after the handoff name none.
    usage = {"iterations": [{"type": "message", "model": "claude-fable-5", "input_tokens": 535, "output_tokens": 0},
                            {"type": "message", "input_tokens": 400, "output_tokens": 50},
                            {"type": "fallback_message", "model": "claude-opus-4-8", "input_tokens": 412,
                             "output_tokens": 264}]}
    assert [p.model for p in samplings(usage, "claude-fable-5")] == ["claude-fable-5", "claude-opus-4-8",
                                                                     "claude-opus-4-8"]


def test_a_chain_where_every_model_declines_is_not_billed():
    from aspy.observe import JsonObserver
    observer = JsonObserver()
    observer.feed(json.dumps({"type": "message", "model": "claude-opus-4-8", "stop_reason": "refusal", "content": [
        {"type": "fallback", "from": {"model": "claude-fable-5"}, "to": {"model": "claude-opus-4-8"}}],
        "usage": {"input_tokens": 412, "output_tokens": 0}}).encode())
    assert not observer.finish().produced_output
