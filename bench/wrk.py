"""Drive a server with wrk: one request posted over and over on a number of connections.

wrk is the fastest load generator at hand (C, one event loop per thread), so requests per
second and latency at few connections are the server's, not the client's.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass
class WrkRun:
    """What one wrk run measured."""

    rps: float
    requests: int
    # Answers other than 2xx or 3xx, and socket errors (connect, read, write, timeout).
    errors: int
    output: str
    p50_ms: float | None = None
    p99_ms: float | None = None


def available() -> bool:
    """Tell whether wrk is installed."""
    return shutil.which("wrk") is not None


def start(url: str, body: bytes, headers: dict[str, str], seconds: float, connections: int,
          latency: bool = False) -> tuple[subprocess.Popen, Path]:
    """Start wrk posting the body at the given concurrency; return it and its script, for :func:`result`."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    script.write_text("\n".join(lines + [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]) + "\n")
    threads = 1 if connections == 1 else 2
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
               "-s", str(script)] + (["--latency"] if latency else []) + [url]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True), script


def result(proc: subprocess.Popen, script: Path) -> WrkRun:
    """Wait for wrk (it reports on SIGINT as at its end) and return what it measured."""
    out = proc.communicate()[0]
    script.unlink()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    requests = re.search(r"(\d+) requests in", out)
    if proc.returncode != 0 or rps is None or requests is None:
        raise RuntimeError(f"wrk failed:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    run = WrkRun(rps=float(rps.group(1)), requests=int(requests.group(1)),
                 errors=(int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0),
                 output=out)
    for pct in ("50", "99"):
        found = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if found:
            setattr(run, f"p{pct}_ms", float(found.group(1)) * UNITS[found.group(2)])
    return run


def run(url: str, body: bytes, headers: dict[str, str], seconds: float, connections: int,
        latency: bool = False) -> WrkRun:
    """Run wrk for the given seconds and return what it measured."""
    return result(*start(url, body, headers, seconds, connections, latency))
