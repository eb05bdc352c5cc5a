"""`aspy top` driven in a real terminal: tmux starts it, sends keys and captures the screen."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import requests

from conftest import API_KEY, AspyProcess

CLIENTS = '\n[clients.alpha]\nname = "Alpha Laptop"\nprovider = "fake"\n[clients.beta]\nname = "Beta Runner"\nprovider = "fake"\n'


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

    def start(self, command: str, env: dict[str, str]) -> None:
        # A terminal of a known size, whatever the environment the tests run in says.
        env = {"TERM": "xterm-256color", "COLUMNS": "170", "LINES": "60", **env}
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        # A session killed just before takes its tmux server down with it: wait until it is gone.
        self.ended()
        self.tmux("new-session", "-d", "-s", "top", "-x", "170", "-y", "60", f"env -u COLUMNS -u LINES {exports} {command}")

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


def send(server, client: str, tool: str | None = None, failing: bool = False) -> None:
    headers = {"x-api-key": API_KEY, "x-claude-code-session-id": f"{client}-session"}
    if tool:
        headers["x-fake-tool"] = tool
    if failing:
        headers["x-fake-status"] = "529"
    requests.post(f"{server.url}/{client}/v1/messages", headers=headers,
                  json={"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})


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
