"""What Anthropic bills for one response, field by field of its ``usage``, before any price.

A response is billed per *sampling*: one step of the model (or of an advisor, or a
compaction) with its own tokens and its own model. Without ``usage.iterations`` the
top-level usage is one sampling at the response's model; with them, every iteration is one
(the top-level figures then leave some out: advisor and compaction iterations). Each
sampling carries what changes its price: fast mode, US-only inference, the Batch API, and
whether it is billed at all (a refusal before any output is not). The model table
(:mod:`aspy.models`) turns a sampling into dollars; docs/pricing.md cites the source of
every rule here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .records import FIVE_MINUTES, ONE_HOUR, Exchange, Usage

# Iteration types (usage.iterations[].type) and what they are.
MESSAGE, ADVISOR, COMPACTION, FALLBACK = "message", "advisor_message", "compaction", "fallback_message"
# No real response has a trillion tokens; a larger count is clamped so sums stay in 64 bits.
MAX_COUNT = 10**12


def count(value: Any) -> int:
    """Return a token count, treating a missing or odd value as 0 and an absurd one as the ceiling."""
    return min(value, MAX_COUNT) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(frozen=True)
class Sampling:
    """One billed step of a response: its model, tokens and price modifiers."""

    model: str | None
    usage: Usage
    kind: str = MESSAGE
    fast: bool = False
    geo_us: bool = False
    batch: bool = False
    # False for a sampling refused before any output: its tokens are reported, not charged.
    billed: bool = True
    # The prompt that decides a long-context band when the tokens are a sum of several
    # samplings (a server-tool loop reported without iterations); None: the sampling's own.
    band_prompt: int | None = None


def tokens(usage: dict, ttl: str = FIVE_MINUTES) -> Usage:
    """Read the tokens of one usage object (or iteration); cache writes with no lifetime take the request's ttl."""
    total_write = count(usage.get("cache_creation_input_tokens"))
    split = usage["cache_creation"] if isinstance(usage.get("cache_creation"), dict) else {}
    write_5m = count(split.get("ephemeral_5m_input_tokens"))
    write_1h = count(split.get("ephemeral_1h_input_tokens"))
    # message_delta may raise the total without a new split: what the split leaves out was
    # written at the lifetime the request asked for.
    unsplit = max(total_write - write_5m - write_1h, 0) if "cache_creation_input_tokens" in usage else 0
    if ttl == ONE_HOUR:
        write_1h += unsplit
    else:
        write_5m += unsplit
    server_tools = usage["server_tool_use"] if isinstance(usage.get("server_tool_use"), dict) else {}
    return Usage(input_tokens=count(usage.get("input_tokens")), output_tokens=count(usage.get("output_tokens")),
                 cache_read=count(usage.get("cache_read_input_tokens")), cache_write_5m=write_5m,
                 cache_write_1h=write_1h, web_search_requests=count(server_tools.get("web_search_requests")))


def samplings(usage: dict, model: str | None, *, ttl: str = FIVE_MINUTES, batch: bool = False,
              refused_before_output: bool = False, first_prompt: int | None = None) -> list[Sampling]:
    """Split one response's usage into the samplings Anthropic bills.

    ``first_prompt`` is the prompt of the response's first sampling (from ``message_start``):
    when the final usage is larger, a server-side tool loop summed several samplings into it.
    """
    fast = usage.get("speed") == "fast"
    geo_us = usage.get("inference_geo") == "us"
    batch = batch or usage.get("service_tier") == "batch"
    iterations = [it for it in usage.get("iterations") or [] if isinstance(it, dict)] \
        if isinstance(usage.get("iterations"), list) else []
    if not iterations:
        whole = tokens(usage, ttl)
        # A band is decided per sampling, never on a sum: the one prompt known whole is the first.
        band_prompt = first_prompt if first_prompt is not None and whole.prompt_tokens > first_prompt else None
        parts = [Sampling(model, whole, fast=fast, geo_us=geo_us, batch=batch, band_prompt=band_prompt)]
    else:
        # Steps that name no model ran on the model that served the turn: after a fallback, not the
        # model message_start named (the one asked for).
        serving = next((it["model"] for it in iterations if it.get("type") == FALLBACK
                        and isinstance(it.get("model"), str)), model)
        parts = []
        for it in iterations:
            kind = it["type"] if isinstance(it.get("type"), str) else MESSAGE
            named = it["model"] if isinstance(it.get("model"), str) else None
            # The advisor is another model: fast mode is the executor's, not its.
            parts.append(Sampling(named or serving, tokens(it, ttl), kind=kind, fast=fast and kind != ADVISOR,
                                  geo_us=geo_us, batch=batch))
        parts = _declined_hops(parts)
        # Web searches are reported once, for the whole response: they go with the first billed step.
        searches = tokens(usage).web_search_requests
        first = answering(parts)
        parts = [replace(p, usage=replace(p.usage, web_search_requests=searches if i == first else 0))
                 for i, p in enumerate(parts)]
    if refused_before_output:
        parts = [replace(p, billed=False) for p in parts]
    return parts


def answering(parts: list[Sampling]) -> int:
    """Return the index of the sampling whose model a response counts for: the first billed one."""
    return next((i for i, p in enumerate(parts) if p.billed), 0)


def _declined_hops(parts: list[Sampling]) -> list[Sampling]:
    """Unbill the hops of a server-side fallback that a model refused before any output."""
    served = next((i for i, p in enumerate(parts) if p.kind == FALLBACK), None)
    if served is None:
        return parts
    return [replace(p, billed=False) if i < served and p.kind == MESSAGE and p.usage.output_tokens == 0 else p
            for i, p in enumerate(parts)]


def context_of(usage: dict, ttl: str = FIVE_MINUTES) -> Usage:
    """Return the tokens of the context window after a response: its last model step, not a sum."""
    iterations = usage["iterations"] if isinstance(usage.get("iterations"), list) else []
    steps = [it for it in iterations if isinstance(it, dict) and it.get("type") in (MESSAGE, FALLBACK, None)]
    return tokens(steps[-1] if steps else usage, ttl)


def total(parts: list[Sampling]) -> Usage:
    """Return the tokens of all samplings together."""
    return sum((p.usage for p in parts), Usage())


def bill(exchange: Exchange) -> list[Sampling]:
    """Return every sampling an exchange is billed for: its response's, or each batch result's."""
    obs, facts = exchange.observation, exchange.request.facts
    if obs.batch_results:
        return [part for result in obs.batch_results
                for part in samplings(result.usage, result.model, batch=True,
                                      refused_before_output=_refused(result.stop_reason, result.produced_output))]
    if obs.usage is None:
        return []
    first = tokens(obs.start_usage, facts.cache_ttl).prompt_tokens if obs.start_usage else None
    return samplings(obs.usage, exchange.model, ttl=facts.cache_ttl, first_prompt=first,
                     refused_before_output=_refused(obs.stop_reason, obs.produced_output))


def _refused(stop_reason: str | None, produced_output: bool) -> bool:
    """Tell whether a response is a refusal that came before any output (and is not billed)."""
    return stop_reason == "refusal" and not produced_output
