"""The model table: list prices and context windows, and the one pricing function.

The table ships as ``models.yaml`` in the package; a ``models.yaml`` beside config.toml
overrides or adds entries. A model id is matched to its table entry after dropping what
providers and dates add (``claude-sonnet-4-5-20250929``, ``claude-3-5-sonnet@20240620``,
``us.anthropic.claude-opus-4-1-20250805-v1:0``); a model not in the table is never priced
as another one.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from .billing import Sampling
from .config import ConfigError
from .records import Usage

RATE_KEYS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
# Table-wide numbers: per 1,000 web searches, and the US-only and Batch API multipliers.
MULTIPLIERS = ("web_search_per_1k", "geo_us_multiplier", "batch_multiplier")
ENTRY_KEYS = {*RATE_KEYS, "context_window", "aliases", "long_context", "fast", "geo_us", "beta_context_window",
              "source", "taken", "note"}
# The parts of a price class (see price_class): how a sampling's tokens are priced.
STANDARD, FAST, LONG, US, BATCH, UNBILLED = "standard", "fast", "long", "us", "batch", "unbilled"
PROVIDER_PREFIX = re.compile(r"^(?:(?:us|eu|apac|jp|au|global)\.)?anthropic\.")
SUFFIXES = (re.compile(r"\[1m\]$"), re.compile(r"@.*$"), re.compile(r"-v\d+(?::\d+)?$"),
            re.compile(r"-\d{8}$"), re.compile(r"-latest$"))
ONE_MILLION_CONTEXT = 1_000_000


@dataclass(frozen=True)
class Rates:
    """USD per million tokens of each kind."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float


@dataclass(frozen=True)
class Model:
    """One table entry, with where its prices come from."""

    id: str
    rates: Rates
    context_window: int
    # Prompts (input + cache reads + cache writes) above this many tokens use long_rates.
    long_above: int | None = None
    long_rates: Rates | None = None
    # Rates when usage.speed is "fast"; None where the model has no fast mode.
    fast: Rates | None = None
    # Whether US-only inference (usage.inference_geo "us") costs the table's geo_us multiplier.
    geo_us: bool = False
    # The context window the context-1m beta opens, for the models that have that option.
    beta_context_window: int | None = None
    source: str = ""
    taken: str = ""


@dataclass(frozen=True)
class Cost:
    """What one sampling cost, what its cache reads saved, and the price class it was billed in."""

    usd: float
    savings_usd: float
    priced: bool
    price_class: str = STANDARD


def family(model_id: str) -> str:
    """Return the table key a provider's model id stands for."""
    name = PROVIDER_PREFIX.sub("", model_id.strip().lower())
    for suffix in SUFFIXES:
        name = suffix.sub("", name)
    return name


def price_class(sampling: Sampling, long: bool = False) -> str:
    """Name the price a sampling is billed at: its speed, band and multipliers, e.g. ``fast+us``."""
    flags = [FAST if sampling.fast else STANDARD]
    flags += [LONG] * long + [US] * sampling.geo_us + [BATCH] * sampling.batch + [UNBILLED] * (not sampling.billed)
    return "+".join(flags)


class ModelTable:
    """Look up models and price usage."""

    def __init__(self, models: dict[str, Model], aliases: dict[str, str], web_search_per_1k: float,
                 source: str, taken: str, geo_us_multiplier: float = 1.1, batch_multiplier: float = 0.5):
        self.models = models
        self.aliases = aliases
        self.web_search_per_1k = web_search_per_1k
        self.source = source
        self.taken = taken
        self.geo_us_multiplier = geo_us_multiplier
        self.batch_multiplier = batch_multiplier

    def find(self, model_id: str | None) -> Model | None:
        """Return the entry for a model id, or None when the table does not know it."""
        if not model_id:
            return None
        key = family(model_id)
        return self.models.get(self.aliases.get(key, key))

    def context_limit(self, model_id: str | None, beta: str = "") -> int | None:
        """Return the context window; the context-1m beta widens it only for models that have that option."""
        model = self.find(model_id)
        if model is None:
            return None
        if "context-1m" in beta and model.beta_context_window:
            return model.beta_context_window
        return model.context_window

    def price(self, sampling: Sampling) -> Cost:
        """Price one sampling at list price; a model the table does not know costs 0 and says so."""
        model = self.find(sampling.model)
        if model is None:
            return Cost(0.0, 0.0, priced=False, price_class=price_class(sampling))
        prompt = sampling.band_prompt if sampling.band_prompt is not None else sampling.usage.prompt_tokens
        # Fast mode has one price across the whole window.
        long = (not sampling.fast and model.long_above is not None and model.long_rates is not None
                and prompt > model.long_above)
        return self.charge(model, price_class(sampling, long), sampling.usage)

    def charge(self, model: Model, klass: str, usage: Usage) -> Cost:
        """Return what tokens cost at a model's price class (the one place rates meet tokens)."""
        flags = set(klass.split("+"))
        if UNBILLED in flags:
            return Cost(0.0, 0.0, priced=True, price_class=klass)
        rates = model.rates
        if FAST in flags and model.fast:
            rates = model.fast
        elif LONG in flags and model.long_rates:
            rates = model.long_rates
        multiplier = ((self.geo_us_multiplier if US in flags and model.geo_us else 1.0)
                      * (self.batch_multiplier if BATCH in flags else 1.0))
        tokens = (usage.input_tokens * rates.input + usage.output_tokens * rates.output
                  + usage.cache_write_5m * rates.cache_write_5m + usage.cache_write_1h * rates.cache_write_1h
                  + usage.cache_read * rates.cache_read)
        searches = usage.web_search_requests * self.web_search_per_1k / 1000
        savings = usage.cache_read * (rates.input - rates.cache_read) * multiplier / 1e6
        return Cost(tokens * multiplier / 1e6 + searches, savings, priced=True, price_class=klass)

    def reprice(self, model_id: str | None, klass: str, usage: Usage) -> Cost | None:
        """Price tokens recorded unpriced, now that the table may know their model; None if it still does not."""
        model = self.find(model_id)
        return self.charge(model, klass, usage) if model else None


def load_models(config_dir: Path | None = None) -> ModelTable:
    """Read the packaged table, then ``models.yaml`` beside config.toml if there is one."""
    packaged = resources.files("aspy").joinpath("models.yaml").read_text(encoding="utf-8")
    data = _parse(yaml.safe_load(packaged), "aspy/models.yaml")
    user_file = config_dir / "models.yaml" if config_dir else None
    try:
        found = bool(user_file and user_file.exists())
        text = user_file.read_text(encoding="utf-8") if user_file and found else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{user_file}: cannot read: {exc}"]) from None
    if found:
        try:
            user = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"{user_file}: not valid YAML: {exc}"]) from None
        except RecursionError:
            raise ConfigError([f"{user_file}: not valid YAML: nested too deeply"]) from None
        override = _parse(user, str(user_file), partial=True)
        data["models"].update(override["models"])
        data["aliases"].update(override["aliases"])
        for key in ("source", "taken", *MULTIPLIERS):
            if key in override:
                data[key] = override[key]
    return ModelTable(data["models"], data["aliases"], data["web_search_per_1k"], data.get("source", ""),
                      data.get("taken", ""), data["geo_us_multiplier"], data["batch_multiplier"])


def _parse(doc: Any, where: str, partial: bool = False) -> dict[str, Any]:
    """Check a models.yaml document; raise ConfigError naming file, model and key."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ConfigError([f"{where}: expected a mapping with a 'models' key"])
    out: dict[str, Any] = {"models": {}, "aliases": {}}
    for key in ("source", "taken"):
        if key in doc:
            out[key] = str(doc[key])
    for key in MULTIPLIERS:
        if key in doc or not partial:
            value = doc.get(key)
            if not _is_price(value):
                problems.append(f"{where}: {key}: expected a number, got {value!r}")
            else:
                out[key] = float(value)
    models = doc.get("models", {})
    if not isinstance(models, dict):
        problems.append(f"{where}: models: expected a mapping of model ids")
        models = {}
    for model_id, entry in models.items():
        spot = f"{where}: models.{model_id}"
        if not isinstance(entry, dict):
            problems.append(f"{spot}: expected a mapping of prices")
            continue
        rates = _rates(entry, spot, problems)
        window = entry.get("context_window")
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            problems.append(f"{spot}: context_window: expected a whole number of tokens, got {window!r}")
            continue
        for unknown in sorted(set(entry) - ENTRY_KEYS, key=str):
            problems.append(f"{spot}: {unknown}: not a known key (expected one of {', '.join(sorted(ENTRY_KEYS))})")
        long_above = long_rates = fast = None
        if "long_context" in entry:
            long = entry["long_context"]
            above = long.get("above") if isinstance(long, dict) else None
            if not isinstance(above, int) or isinstance(above, bool) or above < 0:
                problems.append(f"{spot}: long_context: expected {{above: TOKENS, input: ..., ...}}")
            else:
                long_above, long_rates = long["above"], _rates(long, f"{spot}.long_context", problems)
        if "fast" in entry:
            if isinstance(entry["fast"], dict):
                fast = _rates(entry["fast"], f"{spot}.fast", problems)
            else:
                problems.append(f"{spot}: fast: expected {{input: ..., output: ..., ...}}")
        beta_window = entry.get("beta_context_window")
        if beta_window is not None and (not isinstance(beta_window, int) or beta_window <= 0):
            problems.append(f"{spot}: beta_context_window: expected a whole number of tokens, got {beta_window!r}")
        if not isinstance(entry.get("geo_us", False), bool):
            problems.append(f"{spot}: geo_us: expected true or false, got {entry['geo_us']!r}")
        if rates is None:
            continue
        key = family(str(model_id))
        out["models"][key] = Model(key, rates, window, long_above, long_rates, fast, entry.get("geo_us") is True,
                                   beta_window if isinstance(beta_window, int) else None,
                                   str(entry.get("source", "")), str(entry.get("taken", "")))
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            problems.append(f"{spot}: aliases: expected a list of model ids, got {aliases!r}")
            continue
        for alias in aliases:
            out["aliases"][family(alias)] = key
    if problems:
        raise ConfigError(problems)
    return out


def _rates(entry: dict, spot: str, problems: list[str]) -> Rates | None:
    """Read the five prices of an entry, noting any that is missing or not a number."""
    bad = [k for k in RATE_KEYS if not _is_price(entry.get(k))]
    for key in bad:
        problems.append(f"{spot}: {key}: expected a price in USD per million tokens, got {entry.get(key)!r}")
    return None if bad else Rates(*(float(entry[k]) for k in RATE_KEYS))


def _is_price(value: Any) -> TypeGuard[float]:
    """Tell whether a value is a usable price."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
