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
from typing import Any

import yaml

from .config import ConfigError
from .observe import Usage

RATE_KEYS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
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
    """One table entry."""

    id: str
    rates: Rates
    context_window: int
    # Prompts (input + cache reads + cache writes) above this many tokens use long_rates.
    long_above: int | None = None
    long_rates: Rates | None = None


@dataclass(frozen=True)
class Cost:
    """What one response cost, and what its cache reads saved."""

    usd: float
    savings_usd: float
    priced: bool


def family(model_id: str) -> str:
    """Return the table key a provider's model id stands for."""
    name = PROVIDER_PREFIX.sub("", model_id.strip().lower())
    for suffix in SUFFIXES:
        name = suffix.sub("", name)
    return name


class ModelTable:
    """Look up models and price usage."""

    def __init__(self, models: dict[str, Model], aliases: dict[str, str], web_search_per_1k: float,
                 source: str, taken: str):
        self.models = models
        self.aliases = aliases
        self.web_search_per_1k = web_search_per_1k
        self.source = source
        self.taken = taken

    def find(self, model_id: str | None) -> Model | None:
        """Return the entry for a model id, or None when the table does not know it."""
        if not model_id:
            return None
        key = family(model_id)
        return self.models.get(self.aliases.get(key, key))

    def context_limit(self, model_id: str | None, beta: str = "") -> int | None:
        """Return the context window, 1M when the request asked for the context-1m beta."""
        if "context-1m" in beta:
            return ONE_MILLION_CONTEXT
        model = self.find(model_id)
        return model.context_window if model else None

    def cost(self, model_id: str | None, usage: Usage) -> Cost:
        """Price one response's billed usage at list price; an unknown model costs 0."""
        model = self.find(model_id)
        if model is None:
            return Cost(0.0, 0.0, priced=False)
        rates = model.rates
        prompt = usage.input_tokens + usage.cache_read + usage.cache_write
        if model.long_rates and model.long_above is not None and prompt > model.long_above:
            rates = model.long_rates
        tokens = (usage.input_tokens * rates.input + usage.output_tokens * rates.output
                  + usage.cache_write_5m * rates.cache_write_5m + usage.cache_write_1h * rates.cache_write_1h
                  + usage.cache_read * rates.cache_read)
        searches = usage.web_search_requests * self.web_search_per_1k / 1000
        savings = usage.cache_read * (rates.input - rates.cache_read) / 1e6
        return Cost(tokens / 1e6 + searches, savings, priced=True)


def load_models(config_dir: Path | None = None) -> ModelTable:
    """Read the packaged table, then ``models.yaml`` beside config.toml if there is one."""
    packaged = resources.files("aspy").joinpath("models.yaml").read_text(encoding="utf-8")
    data = _parse(yaml.safe_load(packaged), "aspy/models.yaml")
    user_file = config_dir / "models.yaml" if config_dir else None
    try:
        found = bool(user_file and user_file.exists())
        text = user_file.read_text(encoding="utf-8") if found else ""
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
        for key in ("web_search_per_1k", "source", "taken"):
            if key in override:
                data[key] = override[key]
    return ModelTable(data["models"], data["aliases"], data["web_search_per_1k"],
                      data.get("source", ""), data.get("taken", ""))


def _parse(doc: Any, where: str, partial: bool = False) -> dict[str, Any]:
    """Check a models.yaml document; raise ConfigError naming file, model and key."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ConfigError([f"{where}: expected a mapping with a 'models' key"])
    out: dict[str, Any] = {"models": {}, "aliases": {}}
    for key in ("source", "taken"):
        if key in doc:
            out[key] = str(doc[key])
    if "web_search_per_1k" in doc or not partial:
        price = doc.get("web_search_per_1k")
        if not _is_price(price):
            problems.append(f"{where}: web_search_per_1k: expected a price in USD, got {price!r}")
        else:
            out["web_search_per_1k"] = float(price)
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
        long_above = long_rates = None
        if "long_context" in entry:
            long = entry["long_context"]
            above = long.get("above") if isinstance(long, dict) else None
            if not isinstance(above, int) or isinstance(above, bool) or above < 0:
                problems.append(f"{spot}: long_context: expected {{above: TOKENS, input: ..., ...}}")
            else:
                long_above, long_rates = long["above"], _rates(long, f"{spot}.long_context", problems)
        if rates is None:
            continue
        key = family(str(model_id))
        out["models"][key] = Model(key, rates, window, long_above, long_rates)
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


def _is_price(value: Any) -> bool:
    """Tell whether a value is a usable price."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
