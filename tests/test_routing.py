"""Routing (SPEC 2, 3, 4), in-process: who is asking, by path segment, proxy token or bearer token,
and where their request goes. The upstream is faked with `responses`."""
from __future__ import annotations

import hmac

import pytest
import responses

from aspy import routing
from aspy.config import parse_config
from aspy.errors import AspyError
from aspy.routing import OPERATOR, Caller, api_caller, bearer_token, check_path, client_by_token, resolve, user_hash
from conftest import FAKE_UPSTREAM, in_process_app

TOKEN = "pt_" + "T0kenForTheTokClient_abcdefghij"
OTHER_TOKEN = "pt_" + "0therClientsToken_abcdefghijklm"
# An "=" inside: Werkzeug's Authorization would read it as parameters, not as a token.
API_TOKEN = "admin=api-token-0123456789abcdef"
CENTRAL = "sk-ant-central-provider-key-0004"
KEY = "sk-ant-api03-AAAA-first-key-0001"
TABLES = {
    "server": {"api_token": API_TOKEN},
    "providers": {"central": {"base_url": FAKE_UPSTREAM + "/central", "api_key_env": "ASPY_TEST_CENTRAL_KEY"}},
    "clients": {"tok": {"name": "Token client", "provider": "fake", "proxy_token": TOKEN},
                "other": {"name": "Other team", "provider": "central", "proxy_token": OTHER_TOKEN}},
}


def config(legacy: bool = True, api_token: str | None = API_TOKEN):
    return parse_config({
        "server": {"api_token": api_token} if api_token else {},
        "legacy": {"enabled": legacy, "provider": "fake"},
        "providers": {"fake": {"base_url": FAKE_UPSTREAM}, "fakebase": {"base_url": FAKE_UPSTREAM + "/base/path"}},
        "clients": {"dev-1": {"name": "Dev", "provider": "fake"}, "dev-2": {"name": "CI", "provider": "fakebase"},
                    "tok": {"name": "Token client", "provider": "fake", "proxy_token": TOKEN},
                    "other": {"name": "Other", "provider": "fake", "proxy_token": OTHER_TOKEN}},
    }, None)


CONFIG = config()


@pytest.fixture(scope="module")
def client(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("ASPY_TEST_CENTRAL_KEY", CENTRAL)
    return in_process_app(tmp_path_factory.mktemp("routing"), TABLES).test_client()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def upstream():
    """A fake upstream answering every method and path with a small JSON message."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as fake:
        for method in (responses.GET, responses.POST, responses.PUT, responses.PATCH, responses.DELETE):
            fake.add(responses.Response(method, responses.matchers.re.compile(f"{FAKE_UPSTREAM}/.*"),
                                        json={"type": "message"}, headers={"request-id": "req_1"}))
        yield fake


# resolve: the path names the client and the upstream URL.

@pytest.mark.parametrize("path, query, client, url, rest", [
    ("/dev-1/v1/messages", "", "dev-1", f"{FAKE_UPSTREAM}/v1/messages", "/v1/messages"),
    ("/dev-1/v1/messages", "beta=true", "dev-1", f"{FAKE_UPSTREAM}/v1/messages?beta=true", "/v1/messages"),
    ("/dev-2/v1/messages", "", "dev-2", f"{FAKE_UPSTREAM}/base/path/v1/messages", "/v1/messages"),
    (f"/{TOKEN}/v1/messages", "", "tok", f"{FAKE_UPSTREAM}/v1/messages", "/v1/messages"),
    ("/v1/messages", "", None, f"{FAKE_UPSTREAM}/v1/messages", "/v1/messages"),
    ("/dev-1/v1/files/a%20b", "", "dev-1", f"{FAKE_UPSTREAM}/v1/files/a%20b", "/v1/files/a%20b"),
])
def test_the_first_segment_names_the_client_and_the_rest_goes_to_its_provider(path, query, client, url, rest):
    route = resolve(CONFIG, path, query)
    assert (route.client.id if route.client else None, route.url, route.path) == (client, url, rest)


def test_a_proxy_token_path_keeps_the_token_out_of_the_recorded_path():
    route = resolve(CONFIG, f"/{TOKEN}/v1/messages", "")
    assert TOKEN not in route.path and TOKEN not in route.url


@pytest.mark.parametrize("path, status, message", [
    ("/pt_not-a-real-token-at-all/v1/messages", 401, "Unknown proxy token"),
    (f"/{TOKEN[:-1]}/v1/messages", 401, "Unknown proxy token"),
    ("/tok/v1/messages", 401, "Client 'tok' must be reached with its proxy token, not its id: "
                              "use http://HOST:PORT/<proxy_token>/"),
    ("/nobody/v1/messages", 404, "Unknown client 'nobody'"),
    ("/dev-1/v1/../../admin", 400, "Path may not contain . or .. segments"),
])
def test_a_path_that_names_no_client_it_may_reach_is_refused(path, status, message):
    with pytest.raises(AspyError) as refused:
        resolve(CONFIG, path, "")
    assert (refused.value.status, refused.value.message) == (status, message)


def test_without_legacy_a_path_without_client_gets_404():
    with pytest.raises(AspyError) as refused:
        resolve(config(legacy=False), "/v1/messages", "")
    assert refused.value.status == 404 and "<client-id>" in refused.value.message


@pytest.mark.parametrize("rest", [
    "/v1/../x", "/v1/%2e%2e/x", "/v1/%252e%252e/x", "/v1//x", "/v1/%2F%2Fx/y", "/v1/a\\b", "/v1/a%5cb",
    "/v1/a%0d%0ab", "/v1/a%7fb", "/v1/%25252525252e",
])
def test_a_rest_that_could_leave_the_providers_base_path_gets_400(rest):
    with pytest.raises(AspyError) as refused:
        check_path(rest)
    assert refused.value.status == 400


@pytest.mark.parametrize("rest", ["/v1/messages", "/v1/files/a%20b", "/v1/x.y/", "/", "/v1/models?x=..%2F"])
def test_an_ordinary_rest_passes(rest):
    check_path(rest)


# client_by_token: the one lookup of a client by its proxy token.

@pytest.mark.parametrize("token, found", [
    (TOKEN, "tok"), (OTHER_TOKEN, "other"), (TOKEN[:-1], None), (TOKEN + "x", None), ("", None), ("pt_", None),
    (API_TOKEN, None),
])
def test_a_proxy_token_finds_its_client_and_nothing_else_does(token, found):
    client = client_by_token(CONFIG, token)
    assert (client.id if client else None) == found


def test_every_proxy_token_is_compared_in_constant_time_even_after_a_match(monkeypatch):
    compared = []
    compare_digest = hmac.compare_digest

    def compare(a, b):
        compared.append(a)
        return compare_digest(a, b)

    monkeypatch.setattr(routing.hmac, "compare_digest", compare)
    assert client_by_token(CONFIG, TOKEN).id == "tok"
    assert sorted(compared) == sorted([TOKEN.encode(), OTHER_TOKEN.encode()])


# bearer_token: the one reader of Authorization: Bearer.

@pytest.mark.parametrize("header, token", [
    ("Bearer abc-123", "abc-123"), ("bearer abc-123", "abc-123"), ("BEARER   abc-123  ", "abc-123"),
    (f"Bearer {API_TOKEN}", API_TOKEN), ("Bearer abc==", "abc=="),
    (None, None), ("", None), ("Bearer", None), ("Bearer   ", None), ("Basic YTpi", None), ("Token abc", None),
    ("Bearerabc", None),
])
def test_the_bearer_token_is_read_from_the_authorization_header(header, token):
    assert bearer_token(header) == token


def test_the_legacy_user_hash_takes_the_api_key_then_the_bearer_token():
    assert user_hash(KEY, "Bearer other") == user_hash(KEY, None) == user_hash(None, f"bearer {KEY}")
    assert user_hash(None, f"Basic {KEY}") == user_hash("", "Bearer  ") == "anonymous"


# api_caller: the API's and /metrics' one question, who is this.

@pytest.mark.parametrize("header, caller", [
    (f"Bearer {API_TOKEN}", OPERATOR), (f"bearer {API_TOKEN}", OPERATOR), (f"Bearer {TOKEN}", "tok"),
    (f"Bearer {OTHER_TOKEN}", "other"), (None, None), ("Bearer wrong-token-0123456789", None),
    (f"Basic {API_TOKEN}", None), (API_TOKEN, None), ("Bearer \xe9", None),
])
def test_the_api_token_makes_the_operator_and_a_proxy_token_its_client(header, caller):
    found = api_caller(CONFIG, header)
    assert (found if found in (None, OPERATOR) else found.client.id) == caller


@pytest.mark.parametrize("header", [None, "Bearer anything", f"Bearer {TOKEN}"])
def test_without_an_api_token_every_caller_is_the_operator(header):
    assert api_caller(config(api_token=None), header) == OPERATOR == Caller(None)


# Through the app: what reaches the upstream, and who the API takes the caller for.

def test_a_client_segment_request_reaches_its_provider_with_its_path_and_query(client, upstream):
    r = client.post("/dev-2/v1/messages?beta=true", json={"model": "m"})
    assert r.status_code == 200 and r.json == {"type": "message"}
    assert upstream.calls[-1].request.url == f"{FAKE_UPSTREAM}/base/path/v1/messages?beta=true"


def test_a_proxy_token_request_reaches_its_provider_without_the_token(client, upstream):
    r = client.post(f"/{TOKEN}/v1/messages", json={"model": "m"})
    assert r.status_code == 200
    sent = upstream.calls[-1].request
    assert sent.url == f"{FAKE_UPSTREAM}/v1/messages" and TOKEN not in str(sent.headers)


def test_a_provider_key_replaces_the_clients_credentials(client, upstream):
    client.post(f"/{OTHER_TOKEN}/v1/messages", json={}, headers={"x-api-key": KEY, "Authorization": "Bearer x"})
    sent = upstream.calls[-1].request
    assert sent.url == f"{FAKE_UPSTREAM}/central/v1/messages"
    assert sent.headers["x-api-key"] == CENTRAL and "authorization" not in sent.headers


def test_hop_by_hop_headers_and_those_connection_names_stay_on_this_side(client, upstream):
    client.post("/dev-1/v1/messages", json={}, headers={
        "Connection": "keep-alive, X-Private", "X-Private": "1", "Keep-Alive": "timeout=5", "TE": "trailers",
        "Proxy-Connection": "keep-alive", "Proxy-Authorization": "Basic eA==", "Upgrade": "h2c",
        "Accept-Encoding": "gzip", "X-Kept": "yes", "x-api-key": KEY})
    sent = upstream.calls[-1].request.headers
    assert sent["x-kept"] == "yes" and sent["x-api-key"] == KEY and sent["accept-encoding"] == "identity"
    for name in ("connection", "x-private", "keep-alive", "te", "proxy-connection", "proxy-authorization", "upgrade"):
        assert name not in sent, name


def test_the_answers_hop_by_hop_headers_stay_on_the_upstreams_side(client, upstream):
    upstream.replace(responses.POST, responses.matchers.re.compile(f"{FAKE_UPSTREAM}/.*"), json={"ok": True},
                     headers={"Connection": "close, X-Private", "X-Private": "1", "Keep-Alive": "timeout=5",
                              "Proxy-Connection": "close", "request-id": "req_2", "anthropic-ratelimit-x": "9"})
    r = client.post("/dev-1/v1/messages", json={})
    assert r.headers["request-id"] == "req_2" and r.headers["anthropic-ratelimit-x"] == "9"
    for name in ("X-Private", "Keep-Alive", "Proxy-Connection"):
        assert name not in r.headers, name


def test_an_upstream_error_is_passed_through_as_sent(client, upstream):
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded, as the upstream says"}}'
    upstream.replace(responses.POST, responses.matchers.re.compile(f"{FAKE_UPSTREAM}/.*"), body=body, status=529,
                     content_type="application/json")
    r = client.post("/dev-1/v1/messages", json={})
    assert r.status_code == 529 and r.data == body


def test_a_proxy_token_sees_only_its_clients_data_in_the_api(client):
    r = client.get("/api/clients", headers={"Authorization": f"Bearer {TOKEN}"})
    assert [c["id"] for c in r.json["clients"]] == ["tok"]
    assert len(client.get("/api/clients", headers={"Authorization": f"Bearer {API_TOKEN}"}).json["clients"]) == 4


def test_an_api_token_with_an_equals_sign_inside_is_accepted(client):
    assert client.get("/api/stats", headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 200
