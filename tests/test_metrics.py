"""
Prometheus metrics (pingated.metrics): the counters in memory, and
C{/.pingated/metrics} scraped from a real twistd process after real traffic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Gate, free_port
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import error as neterror
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.test.requesthelper import DummyRequest

from pingated.config import MetricsConfig
from pingated.metrics import (
    GateMetrics,
    metrics_allowed,
    render_metrics,
    upstream_error_kind,
)

LOOPBACK = MetricsConfig().allow
TRUSTED = LOOPBACK


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def _request(
    peer: str = "127.0.0.1", path: bytes = b"/", headers: dict[bytes, bytes] | None = None
) -> DummyRequest:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.client = IPv4Address("TCP", peer, 40000)
    for name, header_value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [header_value])
    return request


# --- in memory ---


def test_each_gate_metrics_has_its_own_registry() -> None:
    """Two instances never share counters (and never touch the global registry)."""
    first, second = GateMetrics(process=False), GateMetrics(process=False)
    first.login("ok")
    first.login("ok")
    assert value(first.exposition().decode(), "pingated_logins_total", result="ok") == 2
    assert value(second.exposition().decode(), "pingated_logins_total", result="ok") == 0
    registry = CollectorRegistry()
    GateMetrics(registry, process=False).revoked()
    assert registry.get_sample_value("pingated_session_revocations_total") == 1


def test_requests_counted_by_site_status_and_body_bytes() -> None:
    """request_done counts the answer under the configured site label, with body sizes."""
    metrics = GateMetrics(process=False)
    metrics.configure(lambda request: "grafana.example.com")
    request = _request(headers={b"content-length": b"1234"})
    request.code = 201
    request.sentLength = 99
    assert metrics.request_done(request) == "grafana.example.com"
    text = metrics.exposition().decode()
    assert value(text, "pingated_http_requests_total", site="grafana.example.com", code="201") == 1
    assert value(text, "pingated_http_request_body_bytes_total", site="grafana.example.com") == 1234
    assert value(text, "pingated_http_response_body_bytes_total", site="grafana.example.com") == 99


def test_a_broken_site_label_falls_back_to_default() -> None:
    """Counting never breaks a request, even if the label function raises."""
    metrics = GateMetrics(process=False)

    def broken(request: Any) -> str:
        raise RuntimeError("boom")

    metrics.configure(broken)
    request = _request()
    request.code = 200
    assert metrics.request_done(request) == "default"


def test_upstream_error_kinds() -> None:
    """Connection failures wrapped by the Agent are classified by their real reason."""
    refused = Failure(ResponseNeverReceived([Failure(neterror.ConnectionRefusedError())]))
    assert upstream_error_kind(refused) == "refused"
    assert upstream_error_kind(Failure(neterror.ConnectionRefusedError())) == "refused"
    assert upstream_error_kind(Failure(neterror.DNSLookupError("x"))) == "dns"
    assert upstream_error_kind(Failure(neterror.TimeoutError())) == "connect_timeout"
    assert upstream_error_kind(Failure(ValueError("?"))) == "unreachable"


def test_upstream_metrics_latency_and_errors() -> None:
    """The proxy-side object observes latency and counts errors for its upstream."""
    metrics = GateMetrics(process=False)
    upstream = metrics.upstream("http://127.0.0.1:3050")
    assert metrics.upstream("http://127.0.0.1:3050") is upstream
    upstream.response(0.02)
    upstream.response(0.3)
    upstream.error("refused")
    text = metrics.exposition().decode()
    name = "pingated_upstream_response_seconds"
    assert value(text, name + "_count", upstream="http://127.0.0.1:3050") == 2
    assert value(text, name + "_bucket", upstream="http://127.0.0.1:3050", le="0.025") == 1
    assert (
        value(
            text,
            "pingated_upstream_errors_total",
            upstream="http://127.0.0.1:3050",
            kind="refused",
        )
        == 1
    )


def test_websocket_gauge_reads_the_live_bridges() -> None:
    """pingated_websockets_active sums open_pairs of watched bridges at scrape time."""

    class Bridge:
        open_pairs = 0

    metrics = GateMetrics(process=False)
    first, second = Bridge(), Bridge()
    metrics.watch_websockets(first)
    metrics.watch_websockets(second)
    first.open_pairs, second.open_pairs = 2, 1
    assert value(metrics.exposition().decode(), "pingated_websockets_active") == 3
    del second  # a bridge from an old configuration, gone
    first.open_pairs = 0
    assert value(metrics.exposition().decode(), "pingated_websockets_active") == 0


def test_metrics_allowed_uses_the_real_client_address() -> None:
    """
    The TCP peer decides, unless it is a trusted proxy: then the address it
    forwarded does -- so visitors coming through a local tunnel are refused.
    """
    assert metrics_allowed(_request("127.0.0.1"), LOOPBACK, TRUSTED)
    assert not metrics_allowed(_request("192.0.2.7"), LOOPBACK, TRUSTED)
    forwarded = {b"x-forwarded-for": b"203.0.113.5"}
    assert not metrics_allowed(_request("127.0.0.1", headers=forwarded), LOOPBACK, TRUSTED)
    forged = {b"x-forwarded-for": b"127.0.0.1"}
    assert not metrics_allowed(_request("192.0.2.7", headers=forged), LOOPBACK, TRUSTED)


def test_render_metrics_answers() -> None:
    """200 text format for allowed, 403 otherwise, 404 when disabled."""
    metrics = GateMetrics(process=False)
    allowed = _request("127.0.0.1")
    body = render_metrics(allowed, metrics, MetricsConfig(), TRUSTED)
    assert allowed.responseCode == 200
    assert b"pingated_logins_total" in body
    assert allowed.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    other = _request("192.0.2.7")
    assert b"pingated_" not in render_metrics(other, metrics, MetricsConfig(), TRUSTED)
    assert other.responseCode == 403
    disabled = _request("127.0.0.1")
    render_metrics(disabled, metrics, MetricsConfig(enabled=False), TRUSTED)
    assert disabled.responseCode == 404


# --- a real gate ---


def scrape(gate: Gate) -> str:
    response = gate.request("GET", "/.pingated/metrics")
    assert response.status == 200, response.body
    assert (response.header("content-type") or "").startswith("text/plain")
    return response.body.decode()


@pytest.fixture
def traffic_gate(gate_factory: Any) -> Iterator[Gate]:
    yield gate_factory()


def test_scrape_after_real_traffic_matches_what_was_sent(traffic_gate: Gate) -> None:
    """
    Logins, proxied requests by status, body bytes, latency samples and
    revocations in /.pingated/metrics equal the traffic the test sent.
    """
    gate = traffic_gate
    before = samples(gate.request("GET", "/.pingated/metrics").body.decode())
    assert ("pingated_build_info", (("version", _version()),)) in before

    for _ in range(2):
        wrong = gate.request(
            "POST",
            "/.pingated/login",
            b"pin=999999&next=/",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert wrong.status == 303
    cookie = gate.login()
    auth = {"Cookie": f"pingated={cookie}"}
    assert gate.request("GET", "/echo", headers={"Accept": "application/json"}).status == 401

    upload = b"u" * 50_000
    assert gate.request("POST", "/echo", upload, auth).status == 200
    big = gate.request("GET", "/big?size=300000", headers=auth)
    assert big.status == 200 and len(big.body) == 300_000
    for _ in range(3):
        assert gate.request("GET", "/status/404", headers=auth).status == 404
    assert gate.request("GET", "/.pingated/logout", headers=auth).status == 303

    text = scrape(gate)
    assert value(text, "pingated_logins_total", result="failed") == 2
    assert value(text, "pingated_logins_total", result="ok") == 1
    assert value(text, "pingated_logins_total", result="throttled") == 0
    assert value(text, "pingated_session_revocations_total") == 1
    # 2 wrong PINs + 1 login + 1 logout answered 303; one 401; 3 upstream 404s.
    assert value(text, "pingated_http_requests_total", site="default", code="303") == 4
    assert value(text, "pingated_http_requests_total", site="default", code="401") == 1
    assert value(text, "pingated_http_requests_total", site="default", code="404") == 3
    # Five requests reached the upstream; each one latency sample.
    upstream = gate.config["upstream"]["url"]
    count = value(text, "pingated_upstream_response_seconds_count", upstream=upstream)
    assert count == 5
    # Request bodies: the upload plus the three login forms.
    form_bytes = 2 * len(b"pin=999999&next=/") + len(b"pin=246810&next=/")
    received = value(text, "pingated_http_request_body_bytes_total", site="default")
    assert received == len(upload) + form_bytes
    # Responses: at least the /big body and the echo's description of the upload.
    sent = value(text, "pingated_http_response_body_bytes_total", site="default")
    assert 300_000 < sent < 300_000 + 200_000
    assert value(text, "pingated_upstream_errors_total", upstream=upstream, kind="refused") == 0


def _version() -> str:
    from pingated import __version__

    return __version__


def test_upstream_errors_counted_by_kind(gate_factory: Any) -> None:
    """An upstream that refuses connections: 502 to the client, kind="refused" in metrics."""
    dead = f"http://127.0.0.1:{free_port()}"
    gate = gate_factory(upstream=dead)
    cookie = gate.login()
    for _ in range(2):
        assert gate.request("GET", "/x", headers={"Cookie": f"pingated={cookie}"}).status == 502
    text = scrape(gate)
    assert value(text, "pingated_upstream_errors_total", upstream=dead, kind="refused") == 2
    assert value(text, "pingated_http_requests_total", site="default", code="502") == 2


def test_websocket_gauge_follows_open_connections(traffic_gate: Gate) -> None:
    """pingated_websockets_active is 1 while a bridged WebSocket is open, 0 after."""
    import websocket

    gate = traffic_gate
    cookie = gate.login()
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{gate.port}/ws",
        header=[f"Cookie: pingated={cookie}"],
        origin=gate.url,
        timeout=10,
    )
    try:
        ws.send("hello")
        assert ws.recv()
        assert value(scrape(gate), "pingated_websockets_active") == 1
    finally:
        ws.close()
    deadline = time.monotonic() + 10
    while value(scrape(gate), "pingated_websockets_active") != 0:
        assert time.monotonic() < deadline, "gauge did not return to 0"
        time.sleep(0.1)


def test_metrics_refused_outside_allow(gate_factory: Any) -> None:
    """allow excluding loopback: 403 and no metrics; a forwarded visitor is refused too."""
    gate = gate_factory(metrics={"allow": ["10.9.9.9/32"]})
    refused = gate.request("GET", "/.pingated/metrics")
    assert refused.status == 403
    assert b"pingated_" not in refused.body
    open_gate = gate_factory()
    assert open_gate.request("GET", "/.pingated/metrics").status == 200
    via_proxy = open_gate.request(
        "GET", "/.pingated/metrics", headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert via_proxy.status == 403


def test_metrics_disabled_is_404(gate_factory: Any) -> None:
    """metrics.enabled = false: the page does not exist."""
    gate = gate_factory(metrics={"enabled": False})
    assert gate.request("GET", "/.pingated/metrics").status == 404
