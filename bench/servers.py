"""The servers a bench run starts and stops: a fake upstream, aspy under gunicorn, scratch databases.

Every process is started here and stopped here, by its own pid (aspy's whole process group,
which it was started in, if it does not stop on SIGINT).
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """Return a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, path: str = "/health", proc: subprocess.Popen | None = None) -> None:
    """Wait until a server on the port answers."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"server exited early with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing answered on port {port}")


def get_json(port: int, path: str) -> dict:
    """Return a GET's JSON answer from a loopback server."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def start_upstream(script: Path, port: int) -> subprocess.Popen:
    """Start a fake upstream (tests/upstream.py or bench/fast_upstream.py) on the port; return once it answers."""
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL)
    try:
        wait_for(port, "/ping", proc)
    except SystemExit:
        stop_upstream(proc)
        raise
    return proc


def stop_upstream(proc: subprocess.Popen) -> None:
    """Stop a fake upstream."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_aspy(folder: Path, name: str, upstream_port: int, store: str = "") -> tuple[subprocess.Popen, int]:
    """Start ``aspy serve`` with its defaults (2 gevent workers) in front of the upstream; return it and its port.

    The client ``bench`` reaches the upstream as the provider ``fake``, at ``/bench/...``; ``store``
    is a ``[store]`` table (SQLite in the folder when empty). Its log is ``folder/name.log``.
    """
    port = free_port()
    config = folder / f"{name}.toml"
    config.write_text(f'{store}[providers.fake]\nbase_url = "http://127.0.0.1:{upstream_port}"\n'
                      f'[clients.bench]\nname = "Bench"\nprovider = "fake"\n')
    env = os.environ | {"XDG_STATE_HOME": str(folder / name)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aspy", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        stdout=(folder / f"{name}.log").open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        start_new_session=True)
    try:
        wait_for(port, proc=proc)
    except SystemExit:
        stop_aspy(proc, folder / f"{name}.log")
        raise
    return proc, port


def start_floor(folder: Path, upstream_port: int) -> tuple[subprocess.Popen, int]:
    """Start the floor (floor.py: Flask and requests under gevent workers, no observation); return it and its port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--worker-class", "gevent", "--workers", "2", "--worker-connections", "1000",
         "--keep-alive", "75", "--bind", f"127.0.0.1:{port}", "floor:app"],
        stdout=(folder / "floor.log").open("w"), stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent,
        env=os.environ | {"UPSTREAM": f"http://127.0.0.1:{upstream_port}"}, start_new_session=True)
    try:
        wait_for(port, "/ping", proc)
    except SystemExit:
        stop_aspy(proc, folder / "floor.log")
        raise
    return proc, port


def stop_aspy(proc: subprocess.Popen, log: Path) -> None:
    """Stop aspy; kill its process group if it has not stopped within 15 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        # A worker still writing a backlog at exit would outlive a scratch database: stop its
        # whole process group, which it started in, before that database is dropped.
        print(f"aspy did not stop within 15 s, killed (see {log})", file=sys.stderr)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def postgres_database(url: str, name: str, create: bool) -> str:
    """Create (or drop) a scratch database; return its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" if create else f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return urlsplit(url)._replace(path=f"/{name}").geturl()
