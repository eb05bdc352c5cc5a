"""`aspy top` driven in a real terminal: tmux starts it, sends keys and captures the screen."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from helpers import API_KEY, AspyProcess

CLIENTS = ('\n[clients.alpha]\nname = "Alpha Laptop"\nprovider = "fake"\n'
           '[clients.beta]\nname = "Beta Runner"\nprovider = "fake"\n')


def two_clients(upstream_url: str) -> str:
    """A config with just the clients alpha and beta."""
    return f'[providers.fake]\nbase_url = "{upstream_url}"\n' + CLIENTS


@pytest.fixture
def tmux():
    """A tmux server of the test's own, killed afterwards."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed; .ci/run installs it")
        pytest.skip("tmux is not installed (apt-get install tmux)")
    socket = f"aspy-top-{uuid.uuid4().hex[:8]}"
    yield Terminal(socket)
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)


class Terminal:
    """One tmux pane running a command."""

    def __init__(self, socket: str):
        self.socket = socket

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True).stdout

    def start(self, command: str, env: dict[str, str], size: tuple[int, int] = (170, 60)) -> None:
        # A terminal of a known size, whatever the environment the tests run in says.
        env = {"TERM": "xterm-256color", **env}
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        # A session killed just before takes its tmux server down with it: wait until it is gone.
        self.ended()
        self.tmux("new-session", "-d", "-s", "top", "-x", str(size[0]), "-y", str(size[1]),
                  f"env -u COLUMNS -u LINES {exports} {command}")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def ended(self, timeout: float = 5) -> bool:
        """Wait for the command to exit (tmux then closes the session)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if subprocess.run(["tmux", "-L", self.socket, "has-session", "-t", "top"], capture_output=True).returncode \
                    and subprocess.run(["tmux", "-L", self.socket, "list-sessions"], capture_output=True).returncode:
                return True
            time.sleep(0.2)
        return False

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def wait_for(self, text: str, timeout: float = 15) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never showed; the screen was:\n{self.screen()}")


def send(server, client: str, tool: str | None = None, failing: bool = False, session: str | None = None,
         stream_for: float | None = None) -> None:
    headers = {"x-api-key": API_KEY, "x-claude-code-session-id": session or f"{client}-session"}
    if tool:
        headers["x-fake-tool"] = tool
    if failing:
        headers["x-fake-status"] = "529"
    body = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    if stream_for:
        # A long turn: an event every 100 ms.
        headers |= {"x-fake-events": str(int(stream_for * 10)), "x-fake-delay": "100"}
        body["stream"] = True
    requests.post(f"{server.url}/{client}/v1/messages", headers=headers, json=body).content


def top_command(url: str) -> str:
    return f"{sys.executable} -m aspy top --url {url}"


def test_top_shows_live_figures_filters_by_client_and_quits(tmux, start_aspy, upstream):
    server = start_aspy(two_clients(upstream.url))
    tmux.start(top_command(server.url), {"PATH": os.environ["PATH"]})
    tmux.wait_for("Requests 0 (0 failed)")
    send(server, "alpha", tool="Bash")
    send(server, "alpha")
    send(server, "beta", failing=True)
    screen = tmux.wait_for("Requests 3 (1 failed)")
    assert "Alpha Laptop" in screen and "Beta Runner" in screen
    screen = tmux.wait_for("overloaded_error")
    assert "tool call" in screen and "Bash" in screen
    # c steps to the first client: only its figures remain.
    tmux.keys("c")
    screen = tmux.wait_for("client: alpha")
    screen = tmux.wait_for("Requests 2 (0 failed)")
    assert "Beta Runner" not in screen and "overloaded_error" not in screen
    tmux.keys("c")
    tmux.wait_for("client: beta")
    tmux.wait_for("Requests 1 (1 failed)")
    tmux.keys("a")
    tmux.wait_for("client: all")
    tmux.wait_for("Requests 3 (1 failed)")
    tmux.keys("q")
    assert tmux.ended(), "aspy top did not quit on q"


def test_top_says_when_the_api_is_unreachable_and_recovers(tmux, upstream, tmp_path):
    server = AspyProcess(tmp_path, two_clients(upstream.url)).start()
    try:
        tmux.start(top_command(server.url), {"PATH": os.environ["PATH"]})
        tmux.wait_for("Requests 0")
        server.stop()
        screen = tmux.wait_for("cannot reach aspy at")
        assert "Traceback" not in screen and "Retrying every second" in screen
        server = AspyProcess(tmp_path, two_clients(upstream.url), port=server.port).start()
        send(server, "alpha")
        screen = tmux.wait_for("Requests 1 (0 failed)")
        assert "cannot reach aspy" not in screen
    finally:
        server.stop()


def test_top_says_when_the_api_refuses_its_token(tmux, start_aspy, upstream):
    config = '[server]\napi_token = "top-admin-token-0123456789"\n' + two_clients(upstream.url)
    server = start_aspy(config)
    tmux.start(top_command(server.url), {"PATH": os.environ["PATH"]})
    screen = tmux.wait_for("refused the API token")
    assert "ASPY_API_TOKEN" in screen and "Traceback" not in screen
    tmux.tmux("kill-session", "-t", "top")
    tmux.start(top_command(server.url), {"PATH": os.environ["PATH"], "ASPY_API_TOKEN": "top-admin-token-0123456789"})
    assert "refused" not in tmux.wait_for("Requests 0 (0 failed)")


def test_top_shows_a_long_turn_in_flight_and_keeps_the_feed_in_view_at_80x24(tmux, start_aspy, upstream):
    server = start_aspy(two_clients(upstream.url))
    for i in range(30):
        send(server, "beta", session=f"many-{i:02d}")
    send(server, "beta", failing=True)
    turn = threading.Thread(target=send, args=(server, "alpha"), kwargs={"session": "long-turn", "stream_for": 8})
    tmux.start(top_command(server.url), {"PATH": os.environ["PATH"]}, size=(80, 24))
    turn.start()
    # The turn shows while it streams, with how long it has run and its time to first byte.
    screen = tmux.wait_for("long-turn")
    row = next(line for line in screen.splitlines() if "long-turn" in line and "alpha" in line)
    assert "claude-sonnet-4-5" in row and " ms" in row
    lines = screen.rstrip("\n").split("\n")
    assert len(lines) <= 24 and lines[0].startswith("aspy top")
    # Thirty-one sessions never push the event feed off an 80x24 screen: the table says how many it hides.
    shown = sum(line.startswith("Beta Runner") for line in lines)
    assert shown >= 3 and f"+{31 - shown} more" in screen
    assert "Recent events" in screen and "overloaded_error" in screen
    turn.join()
    screen = tmux.wait_for("In flight: nothing right now")
    assert "long-turn" in screen  # now a live session, no longer in flight
    tmux.keys("q")
    assert tmux.ended(), "aspy top did not quit on q"


def test_render_at_80x24_cuts_the_sessions_and_says_how_many_more():
    from rich.console import Console

    from aspy.top import Snapshot, render

    stamp = "2026-11-22T10:00:00+00:00"
    session = {"id": "s_1", "claude_session_id": None, "client": "dev-1", "client_name": "Dev", "user": "u",
               "status": "active", "stats": {"requests": {"total": 1}, "tokens": {"input": 1, "output": 1},
                                             "cost": {"total_usd": 0.0, "unpriced_models": []}},
               "context": {"model": "m", "usage_pct": 0.0, "warning_level": "normal"}}
    stats = {"tokens": dict.fromkeys(("input", "output", "cache_read", "cache_write_5m", "cache_write_1h"), 0),
             "cost": {"total_usd": 0.0, "savings_usd": 0.0, "unpriced_models": []},
             "requests": {"total": 0, "failed": 0}, "tools": {"total_calls": 0, "failed_calls": 0},
             "sessions": {"active": 120, "idle": 0, "ended": 0}}
    snapshot = Snapshot(
        clients=[{"id": f"c{i}", "name": f"C{i}", "provider": "p", "active_sessions": 1, "last_seen": stamp}
                 for i in range(9)],
        stats=stats, sessions=[session | {"id": f"s_{i}"} for i in range(50)],
        in_flight=[{"client": "dev-1", "user": "u", "session": f"f{i}", "model": "m", "elapsed_ms": 10,
                    "ttfb_ms": None} for i in range(7)],
        events=[{"timestamp": stamp, "client": "dev-1", "user": "u", "type": "tool_call", "tool": f"Tool{i}"}
                for i in range(15)], at=time.time())
    console = Console(width=80, height=24, force_terminal=True, color_system=None)
    lines = ["".join(s.text for s in line) for line in
             console.render_lines(render(snapshot, "http://x", None, None, console), pad=False)]
    assert len(lines) <= 24
    screen = "\n".join(lines)
    assert "Recent events" in screen and sum("tool call" in line for line in lines) >= 5
    # Every table says how many rows it could not show: clients, requests in flight, live sessions.
    clients = sum(line.startswith("c") and " C" in line for line in lines)
    in_flight = sum(line.startswith("dev-1 ") and "waiting" in line for line in lines)
    sessions = sum(line.startswith("Dev ") for line in lines)
    assert clients and in_flight and sessions >= 3
    for more in (9 - clients, 7 - in_flight, 120 - sessions):
        assert f"+{more} more" in screen
