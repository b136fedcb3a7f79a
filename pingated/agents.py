# -*- test-case-name: tests.test_proxy -*-
"""
Outgoing HTTP clients for upstreams: one shared persistent pool, TLS verified.

Upstreams over HTTPS are checked for certificate and host name
(service-identity), optionally against a custom CA bundle for internal CAs.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail
from twisted.web._newclient import BODY, HTTP11ClientProtocol, _ensureValidURI
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse

from pingated.config import UpstreamConfig

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


#: Bytes read from an upstream socket at once while a response body streams.
#: Measured on 1 MB responses (bench/run.py): 128 KB (Twisted's own send
#: size) moved more per CPU second than the 64 KB default; 256 KB and more
#: cost extra system time.  While the status line and headers are awaited
#: the read is kept small, because the line parser copies what follows each
#: header line (a large first read would be copied once per header).
BODY_READ_SIZE = 128 * 1024
HEAD_READ_SIZE = 16 * 1024


class _UpstreamProtocol(HTTP11ClientProtocol):
    """The stock client protocol, reading response bodies in larger gulps."""

    _wide = False

    def _read_size(self, size: int) -> None:
        transport: Any = self.transport
        if transport is not None and hasattr(transport, "bufferSize"):
            transport.bufferSize = size

    def request(self, request: Any) -> Any:
        """Each response starts with small reads (see L{HEAD_READ_SIZE})."""
        if self._wide:
            self._wide = False
            self._read_size(HEAD_READ_SIZE)
        previous = self._parser
        result = super().request(request)
        if self._parser is not None and self._parser is not previous:
            _drop_connection_named_headers(self._parser)
        return result

    def connectionMade(self) -> None:
        super().connectionMade()
        self._read_size(HEAD_READ_SIZE)

    def dataReceived(self, bytes: bytes) -> None:
        """Parse as usual; once the body streams, read wide."""
        super().dataReceived(bytes)  # type: ignore[no-untyped-call]
        parser: Any = self._parser
        if not self._wide and parser is not None and parser.state == BODY:
            self._wide = True
            self._read_size(BODY_READ_SIZE)


def _drop_connection_named_headers(parser: Any) -> None:
    """
    Make the response parser drop the headers its C{Connection} header names.

    They are hop-by-hop (contract 4, RFC 9110 7.6.1), but Twisted's parser
    keeps C{Connection} to itself (C{connHeaders}) and leaves the headers it
    names among the response's own, where the proxy can no longer tell them
    apart.  They are removed when all headers are in, before the response is
    handed on.
    """
    original = parser.allHeadersReceived

    def all_headers_received() -> None:
        for value in parser.connHeaders.getRawHeaders(b"connection", []):
            for token in value.split(b","):
                name = token.strip().lower()
                if name:
                    parser.headers.removeHeader(name)
        original()

    parser.allHeadersReceived = all_headers_received


class _UpstreamFactory(_HTTP11ClientFactory):
    """Builds L{_UpstreamProtocol}; quiet, because a log line per new connection is noise."""

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _UpstreamProtocol(self._quiescentCallback)  # type: ignore[no-untyped-call]


def make_pool(reactor: Any) -> HTTPConnectionPool:
    """A pool that keeps upstream connections open between requests."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _UpstreamFactory  # type: ignore[assignment]
    pool.maxPersistentPerHost = 64
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False  # never silently resend a non-idempotent request
    return pool


def tls_policy(ca_file: str) -> BrowserLikePolicyForHTTPS:
    """Verifying TLS policy: the system trust store, or only the CAs in C{ca_file}."""
    if not ca_file:
        return BrowserLikePolicyForHTTPS()
    with open(ca_file, "rb") as f:
        pem = f.read()
    certificates = [ssl.Certificate.loadPEM(block) for block in _PEM_RE.findall(pem)]
    if not certificates:
        raise ValueError(f"{ca_file}: no PEM certificates found")
    return BrowserLikePolicyForHTTPS(trustRoot=ssl.trustRootFromCertificates(certificates))


class CachingAgent(Agent):
    """
    An Agent that parses each upstream origin and builds its endpoint once.

    The stock Agent parses the whole URL and makes a new endpoint (IDNA
    encoding the host) for every request, which showed in the request hot
    path's profile.  Requests are otherwise issued exactly as the stock
    Agent does (same pool, same validation of the request target).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._endpoints: dict[tuple[bytes, bytes, int], Any] = {}
        self._origins: dict[bytes, Any] = {}

    def _getEndpoint(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = super()._getEndpoint(uri)  # type: ignore[no-untyped-call]
        return endpoint

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """Issue a request; C{uri} is absolute (C{scheme://host[:port]/path?query})."""
        scheme_end = uri.find(b"://")
        path_start = uri.find(b"/", scheme_end + 3) if scheme_end > 0 else -1
        if path_start < 0:
            return super().request(method, uri, headers, bodyProducer)
        origin, path = uri[:path_start], uri[path_start:]
        parsed = self._origins.get(origin)
        if parsed is None:
            parsed = self._origins[origin] = URI.fromBytes(_ensureValidURI(origin + b"/"))
        try:
            endpoint = self._getEndpoint(parsed)
        except SchemeNotSupported:
            return fail()
        return self._requestWithEndpoint(
            (parsed.scheme, parsed.host, parsed.port),
            endpoint,
            method,
            parsed,
            headers,
            bodyProducer,
            _ensureValidURI(path),
        )


class AgentFactory:
    """Builds one Agent per upstream (its own timeouts and CA), all sharing one pool."""

    def __init__(self, reactor: Any, pool: HTTPConnectionPool) -> None:
        self.reactor = reactor
        self.pool = pool
        self._cache: dict[UpstreamConfig, IAgent] = {}

    def __call__(self, upstream: UpstreamConfig) -> IAgent:
        """The agent for C{upstream} (cached, so a reload reuses connections)."""
        agent = self._cache.get(upstream)
        if agent is None:
            agent = CachingAgent(
                self.reactor,
                contextFactory=tls_policy(upstream.ca_file),
                connectTimeout=upstream.connect_timeout or None,
                pool=self.pool,
            )
            self._cache[upstream] = agent
        return agent
