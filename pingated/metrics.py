# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics: what the gate counts and the C{<prefix>/metrics} page.

Every gate process owns one L{GateMetrics} with a registry of its own (never
prometheus-client's global default), so tests can build several side by
side and a SIGHUP rebuild of the resource tree keeps the counters.

What is counted, and where:

* requests by site and status, request and response body bytes -- once per
  finished request, from the site's C{log} hook (L{GateMetrics.request_done});
* upstream latency (request sent -> response headers) and upstream errors by
  kind -- from the proxy (L{UpstreamMetrics});
* logins ok / failed / throttled / busy and session revocations -- from the
  gate's pages;
* open WebSockets -- read at scrape time from the live bridges'
  C{open_pairs}, so the bridge pays nothing per message.

The hot path pays one cached-child C{inc()} per counter and one histogram
C{observe()} per proxied request; label values come from the configuration
(site host names, upstream URLs, fixed kinds), never from what a client
sends, so the number of series stays bounded.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from pingated import __version__
from pingated.config import IPNetwork, MetricsConfig
from pingated.forwarding import client_ip
from pingated.responses import json_body

#: Seconds; covers a loopback answer (~1 ms) up to a slow LLM's first token.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

#: The label a request gets when it was served by no [[site]] (the [upstream]).
DEFAULT_SITE = "default"

#: Login results counted by C{pingated_logins_total{result=...}}.
LOGIN_RESULTS = ("ok", "failed", "throttled", "busy")


class _OpenCounter(Protocol):
    """What the WebSocket bridge offers: how many bridged pairs are open now."""

    open_pairs: int


def _status_label(code: object) -> str:
    # Only real status codes become label values (bounded: 100..599).
    return str(code) if isinstance(code, int) and 100 <= code <= 599 else "other"


class UpstreamMetrics:
    """
    The proxy's view: latency and errors for one upstream, children pre-bound.

    Built once per upstream per configuration, so a proxied request does not
    look up label values.
    """

    def __init__(self, metrics: GateMetrics, upstream: str) -> None:
        self.upstream = upstream
        self._latency = metrics.upstream_latency.labels(upstream=upstream)
        self._errors_family = metrics.upstream_errors
        self._errors: dict[str, Any] = {}

    def response(self, seconds: float) -> None:
        """An upstream answered (headers in) C{seconds} after the request went out."""
        self._latency.observe(max(0.0, seconds))

    def error(self, kind: str) -> None:
        """An upstream exchange failed; C{kind} is one of L{UPSTREAM_ERROR_KINDS}."""
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._errors_family.labels(
                upstream=self.upstream, kind=kind
            )
        child.inc()


#: Values of C{pingated_upstream_errors_total{kind=...}}.
UPSTREAM_ERROR_KINDS = (
    "refused",  # connection refused
    "dns",  # the upstream's name did not resolve
    "connect_timeout",  # no connection within connect_timeout
    "tls",  # TLS handshake or certificate verification failed
    "idle_timeout",  # no byte either way for idle_timeout (504, or cut mid-body)
    "body_interrupted",  # the upstream dropped the connection mid-response
    "unreachable",  # anything else before a response arrived
)


def upstream_error_kind(failure: Failure) -> str:
    """
    Classify why a request to an upstream failed before any response.

    Twisted wraps connection errors in C{ResponseNeverReceived} and friends;
    their C{reasons} are looked into so a refused connection is "refused",
    not "unreachable".
    """
    failures = [failure]
    failures.extend(r for r in getattr(failure.value, "reasons", []) if isinstance(r, Failure))
    for each in failures:
        if each.check(neterror.ConnectionRefusedError):
            return "refused"
        if each.check(neterror.DNSLookupError):
            return "dns"
        if each.check(neterror.TimeoutError, CancelledError):
            return "connect_timeout"
        module = type(each.value).__module__ or ""
        if module.startswith("OpenSSL") or "SSL" in type(each.value).__name__:
            return "tls"
    return "unreachable"


class GateMetrics:
    """
    All of one gate process's metrics, in a registry of its own.

    Survives SIGHUP (it lives in L{pingated.app.Runtime}); L{configure} is
    called with each new configuration to learn the site names.
    """

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pingated_http_requests",
            "HTTP requests answered, by site ([[site]] host or 'default') and status code.",
            ["site", "code"],
            registry=r,
        )
        self.request_bytes = Counter(
            "pingated_http_request_body_bytes",
            "Request body bytes received from clients, by site.",
            ["site"],
            registry=r,
        )
        self.response_bytes = Counter(
            "pingated_http_response_body_bytes",
            "Response body bytes sent to clients, by site.",
            ["site"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "pingated_upstream_response_seconds",
            "Time from sending a request upstream to receiving its response headers.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "pingated_upstream_errors",
            "Proxied requests that failed at the upstream, by kind.",
            ["upstream", "kind"],
            registry=r,
        )
        self.logins = Counter(
            "pingated_logins",
            "PIN login attempts by result: ok, failed (wrong PIN), throttled "
            "(refused unchecked, 429), busy (503).",
            ["result"],
            registry=r,
        )
        self.revocations = Counter(
            "pingated_session_revocations",
            "Sessions revoked server-side (logout).",
            registry=r,
        )
        self.websockets_active = Gauge(
            "pingated_websockets_active",
            "WebSocket connections bridged to an upstream right now.",
            registry=r,
        )
        self.websockets_active.set_function(self._open_websockets)
        Info("pingated_build", "The running pingated version.", registry=r).info(
            {"version": __version__}
        )
        if process:
            # CPU, memory and open file descriptors of this process.
            ProcessCollector(registry=r)
        self._bridges: weakref.WeakSet[Any] = weakref.WeakSet()
        self._login_children = {
            result: self.logins.labels(result=result) for result in LOGIN_RESULTS
        }
        self._request_children: dict[tuple[str, str], Any] = {}
        self._byte_children: dict[str, tuple[Any, Any]] = {}
        self._upstreams: dict[str, UpstreamMetrics] = {}
        self._site_of: Callable[[IRequest], str] = lambda request: DEFAULT_SITE

    # --- configuration ---

    def configure(self, site_of: Callable[[IRequest], str]) -> None:
        """
        Learn how to name the site a request was served by (from the new
        configuration); the counters themselves are kept.
        """
        self._site_of = site_of

    def upstream(self, url: str) -> UpstreamMetrics:
        """The proxy-side metrics for the upstream at C{url} (one object per URL)."""
        found = self._upstreams.get(url)
        if found is None:
            found = self._upstreams[url] = UpstreamMetrics(self, url)
        return found

    def watch_websockets(self, bridge: _OpenCounter) -> None:
        """Count C{bridge}'s open pairs in C{pingated_websockets_active} while it lives."""
        self._bridges.add(bridge)

    def _open_websockets(self) -> float:
        return float(sum(getattr(bridge, "open_pairs", 0) for bridge in list(self._bridges)))

    # --- events ---

    def login(self, result: str) -> None:
        """One login attempt ended with C{result} (see L{LOGIN_RESULTS})."""
        child = self._login_children.get(result)
        if child is not None:
            child.inc()

    def revoked(self) -> None:
        """A session was revoked server-side."""
        self.revocations.inc()

    def request_done(self, request: IRequest) -> str:
        """
        A request was answered completely (called from the site's C{log});
        returns the site label it was counted under.

        Bytes are body bytes: what the client sent as its request body and
        what the gate wrote as the response body (headers not counted).
        """
        try:
            site = self._site_of(request)
        except Exception:  # a label must never break a request
            site = DEFAULT_SITE
        key = (site, _status_label(getattr(request, "code", None)))
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(site=key[0], code=key[1])
        child.inc()
        bytes_children = self._byte_children.get(site)
        if bytes_children is None:
            bytes_children = self._byte_children[site] = (
                self.request_bytes.labels(site=site),
                self.response_bytes.labels(site=site),
            )
        received = request_body_bytes(request)
        if received:
            bytes_children[0].inc(received)
        sent = getattr(request, "sentLength", 0)
        if sent:
            bytes_children[1].inc(sent)
        return site

    # --- exposition ---

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in this registry."""
        return generate_latest(self.registry)  # type: ignore[no-any-return]


def request_body_bytes(request: IRequest) -> int:
    """
    How many body bytes the client sent: counted by a streaming request as
    they arrived, else the Content-Length twisted.web already read.
    """
    producer = getattr(request, "body_producer", None)
    if producer is not None:
        return int(getattr(producer, "bytes_received", 0))
    values = request.requestHeaders.getRawHeaders(b"content-length")
    if not values:
        return 0
    try:
        return max(0, int(values[0]))
    except ValueError:
        return 0


def metrics_allowed(
    request: IRequest, allow: Sequence[IPNetwork], trusted: Sequence[IPNetwork]
) -> bool:
    """
    Whether C{request} may read the metrics.

    The address checked is the client's as L{client_ip} sees it: the TCP
    peer, or -- only when the peer is a trusted proxy -- the address that
    proxy forwarded.  So a front proxy or tunnel on loopback does not turn
    every internet visitor into "127.0.0.1", and a forged X-Forwarded-For
    from anyone else changes nothing.  UNIX-socket peers are refused: they
    are front proxies, whose visitors are unknown.
    """
    ip = client_ip(request, trusted)
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in allow)


def render_metrics(
    request: IRequest,
    metrics: GateMetrics | None,
    config: MetricsConfig,
    trusted: Sequence[IPNetwork],
) -> bytes:
    """C{<prefix>/metrics}: 404 when disabled, 403 for others, else the text format."""
    if metrics is None or not config.enabled:
        return json_body(request, 404, {"error": "not found"})
    if not metrics_allowed(request, config.allow, trusted):
        return json_body(request, 403, {"error": "forbidden"})
    body = metrics.exposition()
    request.setResponseCode(200)
    request.responseHeaders.setRawHeaders(b"content-type", [CONTENT_TYPE_LATEST.encode("ascii")])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode("ascii")])
    return b"" if request.method == b"HEAD" else body
