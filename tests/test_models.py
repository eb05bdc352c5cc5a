"""The model table and pricing: every real capture billed at list price, families, overrides."""
from __future__ import annotations

from pathlib import Path

import pytest

from aspy.billing import Sampling
from aspy.config import ConfigError
from aspy.models import family, load_models
from aspy.records import Usage
from helpers import EXPECTED, SSE, billed, parse, vercel_stream

# List prices per million tokens, copied by hand from Anthropic's pricing page:
# input, output, 5m cache write, 1h cache write, cache read.
LIST_PRICES = {
    "claude-3-opus-latest": (15, 75, 18.75, 30, 1.50),
    "claude-sonnet-4-20250514": (3, 15, 3.75, 6, 0.30),
    "claude-3-7-sonnet-20250219": (3, 15, 3.75, 6, 0.30),
    "claude-haiku-4-5-20251001": (1, 5, 1.25, 2, 0.10),
    "claude-sonnet-4-5-20250929": (3, 15, 3.75, 6, 0.30),
    "claude-opus-4-6": (5, 25, 6.25, 10, 0.50),
    "claude-opus-4-1-20250805": (15, 75, 18.75, 30, 1.50),
    "claude-sonnet-4-6": (3, 15, 3.75, 6, 0.30),
    "claude-sonnet-5": (2, 10, 2.5, 4, 0.20),
}


def cost(table, model: str, usage: Usage):
    """Price one sampling of a model at standard speed."""
    return table.price(Sampling(model, usage))


@pytest.fixture(scope="module")
def table():
    return load_models()


def list_price(model: str, usage: tuple[int, ...]) -> float:
    """Price usage by hand: tokens at list price, plus $10 per 1,000 web searches."""
    i, o, w5, w1, r = LIST_PRICES[model]
    tokens_in, tokens_out, read, write_5m, write_1h, searches = usage
    return (tokens_in * i + tokens_out * o + write_5m * w5 + write_1h * w1 + read * r) / 1e6 + searches * 0.01


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_capture_is_billed_at_list_price(table, name):
    model, _, usage, _, _ = EXPECTED[name]
    obs = parse((SSE / name).read_bytes())
    charged = cost(table, obs.model, billed(obs))
    assert charged.priced
    assert charged.usd == pytest.approx(list_price(model, usage), abs=1e-12)


def test_web_search_capture_bills_the_search(table):
    obs = parse((SSE / "llm-anthropic_web_search_server_tool_opus41.sse").read_bytes())
    # 10,423 input at $15, 341 output at $75, one search at $10 per 1,000.
    assert cost(table, obs.model, billed(obs)).usd == pytest.approx(0.156345 + 0.025575 + 0.01)


def test_compaction_capture_bills_the_sum_of_its_iterations(table):
    obs = parse((SSE / "pydantic-ai_compaction_cache_read_sonnet46.sse").read_bytes())
    # (100 + 181) input, (83 + 8) output, 55,096 cache reads, at Sonnet 4.6 list price.
    assert cost(table, obs.model, billed(obs)).usd == pytest.approx((281 * 3 + 91 * 15 + 55096 * 0.30) / 1e6)


def test_cache_writes_are_priced_by_lifetime(table):
    obs = parse(vercel_stream())
    expected = list_price("claude-sonnet-5", billed(obs).astuple())
    assert cost(table, obs.model, billed(obs)).usd == pytest.approx(expected)
    assert billed(obs).cache_write_5m == 3337


def test_cache_savings_are_what_reads_saved_against_input_price(table):
    charged = cost(table, "claude-sonnet-4-6", Usage(cache_read=1_000_000))
    assert charged.savings_usd == pytest.approx(3.0 - 0.30)


@pytest.mark.parametrize("model_id,key", [
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-3-5-sonnet@20240620", "claude-3-5-sonnet"),
    ("us.anthropic.claude-opus-4-1-20250805-v1:0", "claude-opus-4-1"),
    ("anthropic.claude-3-haiku-20240307-v1:0", "claude-3-haiku"),
    ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ("claude-opus-4-6[1m]", "claude-opus-4-6"),
])
def test_provider_and_dated_ids_match_their_family(model_id, key):
    assert family(model_id) == key


@pytest.mark.parametrize("model_id", [
    "claude-fable-5-1", "claude-mythos-5", "claude-opus-5-5", "claude-opus-4-8", "claude-opus-4-20250514",
    "claude-opus-4-0", "claude-sonnet-5-5", "claude-sonnet-4-0", "claude-3-7-sonnet-latest",
    "claude-haiku-5-5", "claude-haiku-4-5", "claude-3-5-haiku-20241022", "claude-3-haiku-20240307",
    "claude-3-opus-20240229", "claude-3-sonnet-20240229", "claude-3-5-sonnet-20241022",
])
def test_every_current_family_is_priced(table, model_id):
    assert table.find(model_id) is not None


@pytest.mark.parametrize("model_id", ["claude-opus-4-9", "claude-sonnet-4-5-extra", "gpt-5", "claude-opus"])
def test_unknown_models_are_never_priced_as_another(table, model_id):
    charged = cost(table, model_id, Usage(input_tokens=1000, output_tokens=1000))
    assert not charged.priced and charged.usd == 0


def test_long_prompts_use_the_long_context_band(table):
    short = cost(table, "claude-sonnet-4-5", Usage(input_tokens=200_000, output_tokens=1000))
    long = cost(table, "claude-sonnet-4-5", Usage(input_tokens=200_001, output_tokens=1000))
    assert short.usd == pytest.approx((200_000 * 3 + 1000 * 15) / 1e6)
    assert long.usd == pytest.approx((200_001 * 6 + 1000 * 22.5) / 1e6)


def test_haiku_5_5_prices_prompts_over_100k_higher(table):
    assert cost(table, "claude-haiku-5-5", Usage(input_tokens=100_000)).usd == pytest.approx(0.01)
    assert cost(table, "claude-haiku-5-5", Usage(input_tokens=50_000, cache_read=60_000)).usd == \
        pytest.approx((50_000 * 0.5 + 60_000 * 0.05) / 1e6)


def test_context_window_and_the_1m_beta(table, tmp_path):
    assert table.context_limit("claude-sonnet-4-5-20250929") == 200_000
    # The beta was retired for Sonnet 4.5 (and Haiku 4.5 never had it): the model's own window stands.
    assert table.context_limit("claude-sonnet-4-5-20250929", "context-1m-2025-08-07,other") == 200_000
    assert table.context_limit("claude-haiku-4-5", "context-1m-2025-08-07") == 200_000
    assert table.context_limit("claude-opus-4-6", "context-1m-2025-08-07") == 1_000_000
    assert table.context_limit("claude-unknown") is None
    # A model with the option gets the wider window only when the request asks for it.
    (tmp_path / "models.yaml").write_text("models:\n  claude-in-house-2: {input: 1, output: 1, cache_write_5m: 1, "
                                          "cache_write_1h: 1, cache_read: 1, context_window: 200000, "
                                          "beta_context_window: 1000000}\n")
    own = load_models(tmp_path)
    assert own.context_limit("claude-in-house-2") == 200_000
    assert own.context_limit("claude-in-house-2", "context-1m-2025-08-07") == 1_000_000


def test_user_models_yaml_overrides_and_adds(tmp_path):
    (tmp_path / "models.yaml").write_text("""
models:
  claude-sonnet-4-5: {input: 1, output: 2, cache_write_5m: 0, cache_write_1h: 0, cache_read: 0, context_window: 100}
  claude-in-house-1: {input: 7, output: 7, cache_write_5m: 7, cache_write_1h: 7, cache_read: 7, context_window: 5000}
""")
    table = load_models(tmp_path)
    assert cost(table, "claude-sonnet-4-5-20250929", Usage(input_tokens=1_000_000)).usd == 1
    assert table.find("claude-in-house-1").context_window == 5000
    assert table.find("claude-opus-4-6") is not None


def test_a_bad_user_models_yaml_is_reported_with_file_model_and_key(tmp_path):
    (tmp_path / "models.yaml").write_text("models:\n  claude-x: {input: cheap, output: 1, context_window: 9}\n")
    with pytest.raises(ConfigError) as caught:
        load_models(tmp_path)
    text = "\n".join(caught.value.problems)
    assert f"{tmp_path / 'models.yaml'}: models.claude-x: input: expected a price" in text
    assert "cache_read: expected a price" in text


def sdk_model_ids() -> set[str]:
    """Return every model id the installed anthropic SDK names (its Model literal, and deprecations since 2025).

    Read from the SDK's source, as the names it assigns: importing the package takes two seconds.
    """
    import ast
    import importlib.util

    root = Path(importlib.util.find_spec("anthropic").origin).parent

    def assigned(path: str, name: str) -> ast.expr:
        for node in ast.parse((root / path).read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node.value
        raise AssertionError(f"the installed SDK's {path} no longer assigns {name}")

    # Model = Union[Literal["claude-...", ...], str]: every string in it is a model id.
    ids = {n.value for n in ast.walk(assigned("types/model.py", "Model"))
           if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    deprecated = ast.literal_eval(assigned("resources/messages/messages.py", "DEPRECATED_MODELS"))
    # Models retired before 2025 (Claude 1 and 2, Instant) are out of any bill aspy will see.
    ids.update(m for m in deprecated if not m.startswith(("claude-1", "claude-2", "claude-instant")))
    return ids


def test_the_table_prices_every_model_the_installed_sdk_names(table):
    # A new SDK release that names a model the table lacks fails here, in CI, not on an invoice.
    missing = sorted(m for m in sdk_model_ids() if table.find(m) is None)
    assert missing == [], f"add these to aspy/models.yaml with their source: {missing}"
    assert len(sdk_model_ids()) >= 20


def test_every_row_of_the_table_has_a_source_and_a_date(table):
    for model in table.models.values():
        assert model.source and model.taken, model.id
