"""Real clients through aspy: the official anthropic SDK and the Claude Code CLI."""
from __future__ import annotations

import json
import os
import subprocess
from typing import TYPE_CHECKING

import pytest

from helpers import API_KEY, claude_cli

if TYPE_CHECKING:
    import anthropic


def sdk(aspy, client: str = "dev-1") -> anthropic.Anthropic:
    """Return an SDK client pointed at aspy, with no retries to hide what happened."""
    # Imported in the tests that use it: the SDK takes two seconds to import.
    import anthropic

    return anthropic.Anthropic(base_url=f"{aspy.url}/{client}", api_key=API_KEY, max_retries=0)


def test_sdk_message_through_aspy(aspy, upstream):
    message = sdk(aspy).messages.create(model="claude-sonnet-4-6", max_tokens=32,
                                        messages=[{"role": "user", "content": "hello"}])
    assert message.content[0].text == "Hello from the fake upstream."
    assert message.usage.cache_read_input_tokens == 100
    # The key goes upstream as the SDK sent it (this SDK uses a bearer token).
    seen = upstream.last().headers
    assert seen.get("x-api-key") == API_KEY or seen.get("authorization") == f"Bearer {API_KEY}"


def test_sdk_stream_through_aspy(aspy):
    with sdk(aspy).messages.stream(model="claude-sonnet-4-6", max_tokens=32,
                                   messages=[{"role": "user", "content": "hello"}],
                                   extra_headers={"x-fake-events": "5", "x-fake-delay": "20"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "part 0 part 1 part 2 part 3 part 4 "
    assert final.usage.output_tokens == 7
    assert final.stop_reason == "end_turn"


def test_sdk_stream_of_a_real_capture_with_tools(aspy):
    with sdk(aspy).messages.stream(model="claude-haiku-4-5", max_tokens=32,
                                   messages=[{"role": "user", "content": "weather?"}],
                                   extra_headers={"x-fake-fixture": "sdkpy_snapshot_555fb399_0_tool_use_haiku45.sse"},
                                   ) as stream:
        final = stream.get_final_message()
    assert final.content[0].input == {"location": "San Francisco, CA", "units": "f"}


def test_sdk_reads_upstream_errors_as_sent(aspy):
    import anthropic

    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(aspy).messages.create(model="claude-x", max_tokens=1, messages=[{"role": "user", "content": "x"}],
                                  extra_headers={"x-fake-status": "529"})
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"


def test_sdk_reads_aspy_errors(aspy):
    import anthropic

    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk(aspy, "nobody").messages.create(model="claude-x", max_tokens=1,
                                            messages=[{"role": "user", "content": "x"}])
    assert "nobody" in caught.value.body["error"]["message"]


def test_sdk_sees_a_broken_stream_as_an_api_error(aspy):
    import anthropic

    with pytest.raises(anthropic.APIStatusError) as caught, sdk(aspy).messages.stream(
            model="claude-x", max_tokens=1, messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-fake-break": "3"}) as stream:
        stream.get_final_message()
    assert "broke off" in str(caught.value)


def test_claude_code_cli_runs_through_aspy(aspy, upstream, tmp_path):
    cli = claude_cli()
    before = len(upstream.requests)
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "ANTHROPIC_BASE_URL": f"{aspy.url}/dev-1",
        "ANTHROPIC_API_KEY": API_KEY, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
    }
    done = subprocess.run([cli, "-p", "say hello"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "part 0 part 1 part 2" in done.stdout
    messages = [r for r in upstream.requests[before:] if r.target.startswith("/v1/messages")]
    assert messages, "Claude Code sent no message through aspy"
    sent = messages[-1]
    assert sent.headers["x-api-key"] == API_KEY
    assert "claude-cli" in sent.headers.get("user-agent", "")
    assert json.loads(sent.body)["stream"] is True
