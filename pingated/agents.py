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
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgent

from pingated.config import UpstreamConfig

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def make_pool(reactor: Any) -> HTTPConnectionPool:
    """A pool that keeps upstream connections open between requests."""
    pool = HTTPConnectionPool(reactor, persistent=True)
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
            agent = Agent(
                self.reactor,
                contextFactory=tls_policy(upstream.ca_file),
                connectTimeout=upstream.connect_timeout or None,
                pool=self.pool,
            )
            self._cache[upstream] = agent
        return agent
