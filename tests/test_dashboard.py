"""``GET /dashboard`` in a real browser: Debian's headless chromium, driven through chromedriver.

aspy runs under gunicorn with gevent workers and an ``api_token``, with three weeks of history
brought in by ``aspy migrate --import-logs`` and real traffic of several clients and models
sent through it to the fake upstream; then the page is loaded and read as a person would see
it. Screenshots are kept in ``tests/artifacts/`` (not committed).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from helpers import API_KEY, AspyProcess, api_get, eventually

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The browser's time zone, sent by the page as ?tz=: not the server's (UTC), so that it shows.
BROWSER_TZ = "Europe/Paris"
API_TOKEN = "dash-api-token-0123456789"
OPS_TOKEN = "pt_" + "o" * 32
SONNET, HAIKU, OPUS = "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001", "claude-opus-4-5-20251101"
# A prompt with markup in it: the page must show it as text, never run it.
HOSTILE_PROMPT = 'the zebra sleeps under the bridge <img src=x id="injected" onerror="window.pwned=1"> <b>bold</b>'
CLIENTS = f"""
[server]
api_token = "{API_TOKEN}"

[providers.fake]
base_url = "{{upstream}}"

[clients.dev-1]
name = "Dev Laptop"
provider = "fake"
tags = ["dev"]

[clients.dev-2]
name = "CI runner"
provider = "fake"
tags = ["ci"]

[clients.ops]
name = "Ops box"
provider = "fake"
tags = ["ops"]
proxy_token = "{OPS_TOKEN}"
"""
TIMEOUT = 20


def send(server: AspyProcess, segment: str, model: str, session: str, prompt: str = "hello",
         context: int | None = None) -> None:
    """Send one streamed Messages request through aspy; ``context``: the prompt's size in tokens, mostly cached."""
    headers = {"x-api-key": API_KEY, "x-claude-code-session-id": session}
    if context is not None:
        headers["x-fake-usage"] = json.dumps({"input_tokens": context // 10, "output_tokens": 800,
                                              "cache_read_input_tokens": context - context // 10})
    r = requests.post(f"{server.url}/{segment}/v1/messages", headers=headers,
                      json={"model": model, "max_tokens": 64, "stream": True,
                            "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text


def api(server: AspyProcess, path: str, token: str = API_TOKEN, **params) -> requests.Response:
    """GET an API path with a bearer token."""
    return api_get(server, path, token, **params)


@pytest.fixture(scope="module")
def browser():
    """Headless chromium through chromedriver, in the time zone BROWSER_TZ; skipped where absent."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing; .ci/run installs chromium and chromium-driver")
        pytest.skip(f"the dashboard tests need {', '.join(missing)} (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--lang=en-US", "--window-size=1280,800", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # chromedriver's own binary, never one selenium would download; the browser inherits TZ.
    service = Service(CHROMEDRIVER, env={**os.environ, "TZ": BROWSER_TZ})
    driver = webdriver.Chrome(options=options, service=service)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def write_history(folder: Path, days: int = 20) -> None:
    """Write an earlier aspy's event log with some days of the three clients' traffic, the same every run."""
    dice = random.Random(13)
    now = datetime.now(UTC)
    models = {"dev-1": SONNET, "dev-2": HAIKU, "ops": OPUS}
    lines = []
    for back in range(days, 0, -1):
        for client, model in models.items():
            if dice.random() < 0.3:
                continue
            session = str(uuid.UUID(int=dice.getrandbits(128)))
            start = now - timedelta(days=back, hours=dice.randint(0, 8))
            for n in range(dice.randint(2, 6)):
                at = (start + timedelta(minutes=n)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                base = {"user_id": client, "session_id": session, "tracked_at": at}
                lines.append(base | {"type": "Request", "id": f"{back}-{client}-{n}", "timestamp": at,
                                     "method": "POST", "path": "/v1/messages", "body_size": 100,
                                     "body": {"model": model,
                                              "messages": [{"role": "user", "content": "earlier work"}]}})
                lines.append(base | {"type": "ApiUsage", "timestamp": at, "model": model,
                                     "input_tokens": dice.randint(5, 50), "output_tokens": dice.randint(200, 3000),
                                     "cache_creation_tokens": dice.randint(0, 5000),
                                     "cache_read_tokens": dice.randint(10_000, 90_000)})
    folder.mkdir()
    (folder / "aspy-20261101-000000-dash.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def served(upstream, tmp_path_factory):
    """aspy with an api_token, under gunicorn with two gevent workers, with history and traffic of three clients."""
    tmp = tmp_path_factory.mktemp("dashboard")
    server = AspyProcess(tmp, CLIENTS.format(upstream=upstream.url))
    write_history(tmp / "logs")
    imported = subprocess.run([sys.executable, "-m", "aspy", "migrate", "--config", str(server.config),
                               "--import-logs", str(tmp / "logs"), "--apply"],
                              env=server.env, capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    server.start()
    # Contexts that end at 72 %, 30 % and 88 % of 200,000 tokens: warning, normal and high.
    for n in range(3):
        send(server, "dev-1", SONNET, "dash-dev-1", HOSTILE_PROMPT if n == 0 else f"refactor step {n}",
             context=48_000 * (n + 1))
    for n in range(2):
        send(server, "dev-2", HAIKU, "dash-dev-2", f"run the test suite {n}", context=30_000 * (n + 1))
    send(server, OPS_TOKEN, OPUS, "dash-ops", "rotate the certificates", context=176_000)
    eventually(lambda: api(server, "stats", time_range="last_hour").json()["requests"]["total"] == 6, TIMEOUT)
    yield server
    server.stop()


def open_page(driver, server: AspyProcess, token: str | None = API_TOKEN, width: int = 1280, height: int = 800):
    """Load the dashboard at a viewport size, with a token in the fragment (or none), from a clean slate."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    driver.get(f"{server.url}/health")
    driver.execute_script("sessionStorage.clear(); localStorage.clear();")
    driver.get_log("browser")  # what came before this page is not its fault
    driver.get(f"{server.url}/dashboard" + (f"#token={token}" if token else ""))


def wait(driver, script: str, timeout: float = TIMEOUT):
    """Wait until a JavaScript expression is truthy in the page; return its value."""
    return eventually(lambda: driver.execute_script(f"return {script}"), timeout)


def text(driver, element_id: str) -> str:
    """Return an element's visible text."""
    return driver.execute_script("return document.getElementById(arguments[0]).innerText", element_id)


def screenshot(driver, name: str) -> Path:
    """Save a screenshot of the whole page (not just the viewport) in tests/artifacts/."""
    width, height, mobile = driver.execute_script(
        "return [window.innerWidth, window.innerHeight, window.innerWidth < 600]")
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": full, "deviceScaleFactor": 1, "mobile": mobile})
    time.sleep(0.3)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    print(f"screenshot: {path}")
    return path


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    """Return the page's console errors (a script error, a policy violation), less the allowed ones."""
    # An aspy without /api/usage: the page says so in place of the chart, and works on.
    allowed += ("/api/usage?group_by=day%2Cclient&tz=Europe%2FParis&time_range=last_30_days - Failed to load "
                "resource: the server responded with a status of 404",)
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(a in entry["message"] for a in allowed)]


def usage_answer(server: AspyProcess, by: str) -> dict:
    """Return /api/usage as the page asks for it by default, or skip if this aspy has none."""
    r = api(server, "usage", group_by=f"day,{by}", tz=BROWSER_TZ, time_range="last_30_days")
    if r.status_code == 404:
        pytest.skip("GET /api/usage answers 404 in this tree: the chart cannot be checked against it")
    assert r.status_code == 200, r.text
    return r.json()


def test_page_is_served_without_a_token_with_a_strict_policy_and_files_of_its_own(served):
    page = requests.get(f"{served.url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert all(policy[d] == "'self'" for d in ("script-src", "style-src", "connect-src", "img-src"))
    assert "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    # Everything the page loads comes from aspy itself: no CDN, nothing to build.
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert links and not [link for link in links if "//" in link or ":" in link]
    for link in links:
        asset = requests.get(f"{served.url}/{link}")
        assert asset.status_code == 200 and asset.content, link
    assert "MIT License" in requests.get(f"{served.url}/dashboard/static/vendor/LICENSE-uPlot").text
    # The page is the only thing under /dashboard; the proxy's paths are untouched.
    assert requests.get(f"{served.url}/dashboard/", allow_redirects=False).headers["location"] == "/dashboard"
    missing = requests.get(f"{served.url}/dashboard/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert requests.get(f"{served.url}/static/dashboard.js").json()["error"]["message"] == "Unknown client 'static'"


def test_charts_are_drawn_from_recorded_traffic_by_client_model_and_tag(browser, served):
    by_client = usage_answer(served, "client")
    open_page(browser, served)
    wait(browser, "document.querySelectorAll('#breakdown tbody tr[data-group]').length >= 3")
    shown = {by: usage_answer(served, by) for by in ("client", "model", "tag")}
    assert shown["client"]["total"] == by_client["total"], "traffic moved while the test ran"
    total = shown["client"]["total"]

    # The totals the page shows are /api/usage's, to the last digit.
    def figure(element_id):
        return float(browser.execute_script("return document.getElementById(arguments[0]).dataset.value", element_id))
    tokens = sum(total["tokens"][k] for k in ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h"))
    assert wait(browser, "document.getElementById('total-cost').dataset.value !== ''")
    assert figure("total-cost") == pytest.approx(total["cost_usd"], abs=1e-12) and total["cost_usd"] > 0
    assert figure("total-tokens") == tokens
    assert figure("total-requests") == total["requests"] > 6
    assert text(browser, "total-requests") == f"{total['requests']:,}"

    # The chart's series are the clients, its bars the recorded figures, and the legend says so.
    for by, names in (("client", {"dev-1", "dev-2", "ops"}),
                      ("model", {SONNET, HAIKU, OPUS}),
                      ("tag", {"dev", "ci", "ops"})):
        browser.execute_script("const s = document.getElementById('by'); s.value = arguments[0];"
                               "s.dispatchEvent(new Event('change'));", by)
        wait(browser, f"document.getElementById('breakdown-by').textContent.toLowerCase() === '{by}'")
        wait(browser, f"aspyDashboard.chart && aspyDashboard.chart.series.length === {len(names) + 1}")
        series = browser.execute_script("return aspyDashboard.chart.series.slice(1).map(s => s.label)")
        legend = browser.execute_script(
            "return [...document.querySelectorAll('#breakdown tbody tr')].map(r => r.dataset.group)")
        assert set(series) == set(legend) == names
        expect = {}
        for row in shown[by]["rows"]:
            expect[row[by]] = expect.get(row[by], 0) + row["cost_usd"]
        drawn = browser.execute_script(
            "return Object.fromEntries(aspyDashboard.chartGroups.map("
            "g => [g.name, g.values.reduce((a, b) => a + b, 0)]))")
        assert drawn == pytest.approx(expect, abs=1e-12)
        # The tallest bar of the stack is the day's total over every group.
        top = browser.execute_script("return aspyDashboard.chart.data[1].reduce((a, b) => a + b, 0)")
        assert top == pytest.approx(total["cost_usd"], abs=1e-12)

    # Tokens instead of cost: the same groups, counted in tokens.
    browser.execute_script("const s = document.getElementById('measure'); s.value = 'tokens';"
                           "s.dispatchEvent(new Event('change'));")
    wait(browser, "aspyDashboard.chart.series.length === 4 && "
                  f"aspyDashboard.chart.data[1].reduce((a, b) => a + b, 0) === {tokens}")
    browser.execute_script("const s = document.getElementById('measure'); s.value = 'cost';"
                           "s.dispatchEvent(new Event('change'));"
                           "const b = document.getElementById('by'); b.value = 'client';"
                           "b.dispatchEvent(new Event('change'));")
    wait(browser, "aspyDashboard.chart.series.length === 4 && "
                  "document.getElementById('breakdown-by').textContent === 'Client'")

    # The page asked in the browser's time zone.
    asked = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('/api/usage'))")
    assert asked and all(parse_qs(urlsplit(url).query)["tz"] == [BROWSER_TZ] for url in asked)
    assert not console_errors(browser)
    shot = screenshot(browser, "dashboard-desktop")
    if os.environ.get("ASPY_UPDATE_SCREENSHOT"):
        # The README's picture: ASPY_UPDATE_SCREENSHOT=1 python -m pytest tests/test_dashboard.py
        shutil.copy(shot, Path(__file__).resolve().parents[1] / "docs" / "img" / "dashboard.png")


def test_a_new_session_appears_without_a_reload(browser, served):
    open_page(browser, served)
    wait(browser, "document.querySelector('#sessions li[data-claude-session=\"dash-dev-1\"]')")
    browser.execute_script("window.notReloaded = true")
    key = f"dash-new-{uuid.uuid4().hex[:8]}"
    send(served, "dev-2", HAIKU, key, "a fresh session")
    card = wait(browser, f"document.querySelector('#sessions li[data-claude-session=\"{key}\"]')")
    assert browser.execute_script("return window.notReloaded === true")
    assert "CI runner" in card.text and "active" in card.text and "1 request" in card.text
    # Its context gauge, as /api/context has it.
    session = eventually(lambda: [c for c in api(served, "context").json()["contexts"]
                                  if c.get("claude_session_id") == key], TIMEOUT)[0]
    gauge = card.find_element("css selector", "[role=meter]")
    assert float(gauge.get_attribute("aria-valuenow")) == session["usage_pct"]
    assert f"{session['current_tokens']:,} / {session['limit_tokens']:,} tokens" in card.text
    # Each gauge is coloured by its session's warning level.
    levels = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#sessions li[data-claude-session]')]"
        ".map(li => [li.dataset.claudeSession, li.querySelector('.gauge').className]))")
    assert {k: levels[k] for k in ("dash-dev-1", "dash-dev-2", "dash-ops")} == {
        "dash-dev-1": "gauge warning", "dash-dev-2": "gauge normal", "dash-ops": "gauge high"}
    # The event feed shows its request too.
    wait(browser, "[...document.querySelectorAll('#events li')]"
                  f".some(li => li.innerText.includes('{session['session'][:8]}'))")
    assert not console_errors(browser)


def test_search_shows_the_snippet_of_a_recorded_prompt_as_text(browser, served):
    open_page(browser, served)
    field = browser.find_element("id", "search-input")
    field.send_keys("zebra")
    browser.find_element("css selector", "#search-form button[type=submit]").click()
    result = wait(browser, "document.querySelector('#search-results li')")
    assert [m.text for m in result.find_elements("css selector", "mark")] == ["zebra"]
    assert "dev-1" in result.text and "user" in result.text
    # The prompt's markup is shown as the text it was, and nothing of it ran.
    assert "<b>bold</b>" in result.text or "<img" in result.text
    assert browser.execute_script("return document.getElementById('injected') === null && window.pwned === undefined")
    assert "1 match" in text(browser, "search-summary")
    screenshot(browser, "dashboard-search")
    assert not console_errors(browser)


def test_api_token_is_asked_for_then_kept_for_the_tab(browser, served):
    open_page(browser, served, token=None)
    alert = wait(browser, "!document.getElementById('alert').hidden && document.getElementById('alert')")
    assert "needs an API token (401)" in alert.text
    assert browser.find_element("id", "token-form").is_displayed()
    screenshot(browser, "dashboard-token")

    field = browser.find_element("id", "token-input")
    field.send_keys("wrong-token-0123456789")
    browser.find_element("css selector", "#token-form button[type=submit]").click()
    wait(browser, "document.getElementById('alert').innerText.includes('refused this token (401)')")

    # The refused token opens the form again, ready for the right one.
    wait(browser, "!document.getElementById('token-form').hidden")
    field = browser.find_element("id", "token-input")
    field.clear()
    field.send_keys(API_TOKEN)
    browser.find_element("css selector", "#token-form button[type=submit]").click()
    wait(browser, "document.getElementById('alert').hidden")
    wait(browser, "document.querySelector('#sessions li[data-claude-session]')")
    # Kept in the tab's sessionStorage (not localStorage, unless asked), so a reload needs no token.
    assert browser.execute_script("return sessionStorage.getItem('aspy.token')") == API_TOKEN
    assert browser.execute_script("return localStorage.getItem('aspy.token')") is None
    browser.refresh()
    wait(browser, "document.querySelector('#sessions li[data-claude-session]')")
    assert browser.execute_script("return document.getElementById('alert').hidden")
    assert not console_errors(browser, allowed=("status of 401",))


def test_a_token_in_the_fragment_is_used_then_wiped_and_a_proxy_token_sees_its_client_only(browser, served):
    open_page(browser, served, token=OPS_TOKEN)
    wait(browser, "document.querySelector('#sessions li[data-claude-session=\"dash-ops\"]')")
    assert "#token" not in browser.current_url
    wait(browser, "document.getElementById('client-filter').options.length === 2")
    assert browser.execute_script(
        "return [...document.getElementById('client-filter').options].map(o => o.value)") == ["", "ops"]
    sessions = browser.execute_script(
        "return [...document.querySelectorAll('#sessions li[data-claude-session]')]"
        ".map(li => li.dataset.claudeSession)")
    assert sessions == ["dash-ops"]
    clients = browser.execute_script(
        "return [...new Set([...document.querySelectorAll('#events .who')].map(w => w.innerText.split(' ')[0]))]")
    assert clients == ["ops"]
    if api(served, "usage", OPS_TOKEN, group_by="day,client", tz=BROWSER_TZ).status_code == 200:
        wait(browser, "document.querySelectorAll('#breakdown tbody tr[data-group]').length === 1")
        assert browser.execute_script("return document.querySelector('#breakdown tbody tr').dataset.group") == "ops"
    assert not console_errors(browser)


@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)], ids=["laptop", "phone"])
def test_page_fits_the_screen_without_horizontal_scrolling(browser, served, width, height):
    open_page(browser, served, width=width, height=height)
    wait(browser, "document.querySelector('#sessions li[data-claude-session]')")
    wait(browser, "document.querySelectorAll('#events li').length > 1")
    assert browser.execute_script("return window.innerWidth") == width
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    # No element sticks out on the right either (a wide table, a long model name, a snippet).
    wider = browser.execute_script(
        "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > innerWidth + 1)"
        ".filter(e => !e.closest('.scroll')).map(e => e.tagName + '#' + e.id + '.' + e.className)")
    assert wider == []
    screenshot(browser, f"dashboard-{width}x{height}")


def test_a_store_outage_is_told_on_the_page(browser, upstream, tmp_path):
    # A store file that is not a database: the proxy forwards, every read answers 503.
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not a database " * 512)
    server = AspyProcess(tmp_path, CLIENTS.format(upstream=upstream.url) +
                         f'\n[store]\nurl = "sqlite:///{broken}"\n', workers=1).start()
    try:
        assert api(server, "sessions").status_code == 503
        open_page(browser, server)
        alert = wait(browser, "!document.getElementById('alert').hidden && document.getElementById('alert')")
        assert "cannot read its store right now (503)" in alert.text and "proxy keeps forwarding" in alert.text
        assert "retrying" in text(browser, "status")
    finally:
        server.stop()
    # And when aspy itself is gone, the page says that too.
    alert = wait(browser, "document.getElementById('alert').innerText.includes('cannot be reached')")
    assert alert


def test_an_aspy_without_traffic_says_so_in_every_panel(browser, upstream, tmp_path):
    server = AspyProcess(tmp_path, CLIENTS.format(upstream=upstream.url), workers=1).start()
    try:
        open_page(browser, server)
        wait(browser, "document.getElementById('total-requests').dataset.value === '0'")
        browser.execute_script("const s = document.getElementById('range'); s.value = 'all';"
                               "s.dispatchEvent(new Event('change'));")
        wait(browser, "aspyDashboard.chart && aspyDashboard.chart.data[0].length === 1")
        assert "No traffic in this period." in text(browser, "breakdown")
        assert "No live session" in text(browser, "sessions")
        assert "No events yet." in text(browser, "events")
        assert browser.execute_script("return document.getElementById('alert').hidden")
        assert not console_errors(browser)
    finally:
        server.stop()
