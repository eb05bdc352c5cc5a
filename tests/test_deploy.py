"""Deployment (SPEC 8): the shipped nginx site, systemd unit, gunicorn settings and wsgi.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import requests

from aspy.serving import LONGEST_STREAM
from conftest import ROOT, AspyProcess, free_port, standard_config, wait_for_health
from test_sessions_api import eventually

UNIT = ROOT / "systemd" / "aspy.service"
SITE = ROOT / "conf" / "nginx" / "aspy.conf"
MESSAGE = {"model": "claude-sonnet-4-5-20250929", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
TOKEN = "pt_DeployTestToken0123456789abcdefXY"


def unit_settings() -> dict[str, list[str]]:
    """Read the unit file's settings; a key may repeat."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_is_hardened_and_outlives_graceful_shutdown():
    unit = unit_settings()
    one = {k: v[-1] for k, v in unit.items()}
    assert one["Type"] == "notify" and one["Restart"] == "on-failure"
    assert one["StateDirectory"] == "aspy" and "XDG_STATE_HOME=/var/lib" in unit["Environment"]
    assert one["User"] == "aspy" and one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict" and one["ProtectHome"] == "yes" and one["PrivateTmp"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    assert "-HUP" in one["ExecReload"]
    from aspy.config import ServerSettings
    from aspy.serving import gunicorn_settings
    graceful = gunicorn_settings(ServerSettings())["graceful_timeout"]
    assert graceful > LONGEST_STREAM
    assert int(one["TimeoutStopSec"]) > graceful


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    aspy = shutil.which("aspy") or pytest.skip("the aspy command is not installed (pip install -e .)")
    unit = tmp_path / "aspy.service"
    # Verify the unit as shipped, with its command pointed at this machine's aspy.
    unit.write_text(UNIT.read_text().replace("/opt/aspy/.venv/bin/aspy", aspy))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "aspy.service" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def test_gunicorn_conf_takes_server_settings_without_loading_the_app(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:9123"\nworkers = 3\n')
    probe = (f"import runpy, sys, json; s = runpy.run_path({str(ROOT / 'conf' / 'gunicorn.conf.py')!r}); "
             "print(json.dumps({k: s[k] for k in ('bind', 'workers', 'worker_class', 'graceful_timeout', "
             "'preload_app', 'wsgi_app')} | {'loaded': sorted(m for m in ('flask', 'requests', 'gevent', "
             "'aspy.proxy') if m in sys.modules)}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "ASPY_CONFIG": str(config)}).stdout
    settings = json.loads(out)
    assert settings["bind"] == ["127.0.0.1:9123"] and settings["workers"] == 3
    assert settings["worker_class"] == "aspy.worker.AspyWorker" and settings["preload_app"] is False
    assert settings["graceful_timeout"] > LONGEST_STREAM and settings["wsgi_app"] == "wsgi:app"
    assert settings["loaded"] == []


def test_gunicorn_with_the_shipped_conf_and_wsgi_serves(upstream, tmp_path):
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(standard_config(upstream.url).replace("[server]\n", f'[server]\nlisten = "127.0.0.1:{port}"\n'))
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py"], cwd=ROOT,
                            env={**os.environ, "ASPY_CONFIG": str(config), "XDG_STATE_HOME": str(tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", proc)
        r = requests.post(f"http://127.0.0.1:{port}/dev-1/v1/messages", json=MESSAGE | {"stream": True})
        assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)


@pytest.fixture
def aspy_behind_nginx(upstream, tmp_path):
    """aspy under gunicorn, with a client that has a proxy token, for nginx to stand in front of."""
    aspy = AspyProcess(tmp_path, standard_config(upstream.url, f'[clients.tok]\nname = "Token client"\n'
                                                               f'provider = "fake"\nproxy_token = "{TOKEN}"\n')).start()
    yield aspy
    aspy.stop()


@pytest.fixture
def behind_nginx(aspy_behind_nginx, tmp_path):
    """aspy under gunicorn, with the real nginx and the shipped site in front."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed; .ci/run installs it")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    aspy = aspy_behind_nginx
    port = free_port()
    site = SITE.read_text()
    assert "server 127.0.0.1:8080;" in site and "listen 80;" in site
    (tmp_path / "aspy.conf").write_text(site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{aspy.port};")
                                        .replace("listen 80;", f"listen 127.0.0.1:{port};")
                                        .replace("/var/log/nginx/", f"{tmp_path}/"))
    temp = {name: tmp_path / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    (tmp_path / "nginx.conf").write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    # As Debian's nginx.conf has it: every site logs here unless it says otherwise.
    access_log {tmp_path}/access.log;
    client_body_temp_path {temp['body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    include {tmp_path}/aspy.conf;
}}
""")
    proc = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(url, proc)
    yield url
    proc.send_signal(signal.SIGQUIT)
    proc.wait(10)


def test_a_stream_arrives_event_by_event_through_nginx(behind_nginx):
    started = time.time()
    r = requests.post(f"{behind_nginx}/dev-1/v1/messages", json=MESSAGE | {"stream": True},
                      headers={"x-fake-events": "8", "x-fake-delay": "300"}, stream=True)
    arrivals = [time.time() - started for line in r.iter_lines() if line.startswith(b"event:")]
    assert len(arrivals) == 13
    assert arrivals[-1] > 2.5
    assert arrivals[0] < arrivals[-1] - 2
    assert arrivals[6] - arrivals[2] > 0.9


def test_a_30_mib_body_goes_through_nginx(behind_nginx, upstream):
    body = os.urandom(30 * 1024 * 1024)
    r = requests.post(f"{behind_nginx}/dev-1/v1/files", data=body,
                      headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200
    assert upstream.last().body == body


def test_an_oversized_body_gets_aspys_own_413_through_nginx(behind_nginx):
    r = requests.post(f"{behind_nginx}/dev-1/v1/files", data=b"x" * (32 * 1024 * 1024 + 1))
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_nginx_logs_never_carry_a_proxy_token(behind_nginx, tmp_path):
    assert requests.post(f"{behind_nginx}/{TOKEN}/v1/messages?beta=true", json=MESSAGE).status_code == 200
    # nginx refuses this one itself, and logs it as an error naming the request line.
    too_large = requests.post(f"{behind_nginx}/{TOKEN}/v1/files", headers={"content-length": str(34 * 1024 * 1024)})
    assert too_large.status_code == 413
    # nginx logs a request when it has finished with it, which for the refused body is a moment later.
    logs = eventually(lambda: (found := {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")})
                      and '"POST /pt_.../v1/files HTTP/1.1" 413' in found.get("aspy.access.log", "") and found)
    assert '"POST /pt_.../v1/messages?beta=true HTTP/1.1" 200' in logs["aspy.access.log"]
    for name, text in logs.items():
        assert TOKEN not in text and TOKEN[3:] not in text, name


def test_a_body_over_nginx_limit_gets_413_in_anthropic_shape(behind_nginx):
    r = requests.post(f"{behind_nginx}/dev-1/v1/files", headers={"content-length": str(34 * 1024 * 1024)})
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "request_too_large" and "32 MiB" in r.json()["error"]["message"]


def test_aspy_unreachable_behind_nginx_gets_502_in_anthropic_shape(behind_nginx, aspy_behind_nginx):
    aspy_behind_nginx.stop()
    r = requests.post(f"{behind_nginx}/dev-1/v1/messages", json=MESSAGE)
    assert r.status_code == 502 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "upstream_error"
