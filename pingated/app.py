# -*- test-case-name: tests.test_app -*-
"""
Composition: turns a L{Config} into the resource tree that serves requests.

A request flows: host routing -> the site's gate pages (under the prefix) or
the auth wrapper -> feature wrappers (identity, ...) -> the proxy.  Each
wrapper knows nothing of the others; this module is the only place that
knows the order.  Long-lived state (revocations, throttle counters, the
connection pool) lives in L{Runtime} and survives a SIGHUP rebuild.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent, IRequest
from twisted.web.resource import IResource, Resource

from pingated.config import Config, SiteConfig, UpstreamConfig
from pingated.forwarding import host_without_port, request_host
from pingated.gate import AuthResource, GateContext, GatePages
from pingated.identity import IdentityResource
from pingated.pins import PinVerifier
from pingated.proxy import ProxyResource
from pingated.responses import error_body
from pingated.sessions import RevocationStore, SessionManager
from pingated.threads import RunInThread
from pingated.throttle import Throttle

AgentFactory = Callable[[UpstreamConfig], IAgent]


@attrs.define
class Runtime:
    """State and collaborators that outlive one configuration (kept across SIGHUP)."""

    reactor: Any
    clock: IReactorTime
    run_in_thread: RunInThread
    agent_for: AgentFactory
    revocations: RevocationStore
    throttle: Throttle
    started: float


class SiteRoot(Resource):
    """One site: the gate's pages under the prefix, everything else protected."""

    isLeaf = True

    def __init__(self, prefix: str, pages: IResource, protected: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.prefix = prefix.encode("ascii")
        self.prefix_segments = self.prefix.strip(b"/").split(b"/")
        self.pages = pages
        self.protected = protected

    def render(self, request: IRequest) -> Any:
        """Dispatch on the path: the gate's own pages, or the protected app."""
        request.responseHeaders.setRawHeaders(b"server", [b"pingated"])
        path = request.path
        if path == self.prefix or path.startswith(self.prefix + b"/"):
            rest = path[len(self.prefix) :].lstrip(b"/")
            request.prepath = list(self.prefix_segments)
            request.postpath = rest.split(b"/") if rest else []
            return self.pages.render(request)
        return self.protected.render(request)


class HostRouter(Resource):
    """Chooses the site by the Host the client used; unknown hosts get the default."""

    isLeaf = True

    def __init__(
        self,
        sites: Sequence[tuple[SiteConfig, IResource]],
        default: IResource | None,
        trusted: Sequence[Any],
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.exact = {
            site.host: resource for site, resource in sites if not site.host.startswith("*.")
        }
        # Longest wildcard first, so *.a.example.com wins over *.example.com.
        self.wildcards = sorted(
            ((site, resource) for site, resource in sites if site.host.startswith("*.")),
            key=lambda pair: -len(pair[0].host),
        )
        self.default = default
        self.trusted = tuple(trusted)

    def pick(self, host: str) -> IResource | None:
        """The resource serving C{host} (no port), or the default."""
        found = self.exact.get(host)
        if found is not None:
            return found
        for site, resource in self.wildcards:
            if site.matches(host):
                return resource
        return self.default

    def render(self, request: IRequest) -> Any:
        """Route by Host; 404 when nothing serves it."""
        host = host_without_port(request_host(request, self.trusted))
        target = self.pick(host)
        if target is None:
            return error_body(request, 404, "Not Found", "unknown host")
        return target.render(request)


def read_text(path: str) -> str:
    """A small text file (CSS); empty when unset.  Called at build time, not per request."""
    if not path:
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


def _protected_chain(
    upstream: UpstreamConfig,
    identity: Sequence[tuple[str, str]],
    config: Config,
    runtime: Runtime,
) -> IResource:
    proxy = ProxyResource(
        runtime.agent_for(upstream), upstream, config.server.trusted_proxies, runtime.clock
    )
    chain: IResource = proxy
    if identity:
        chain = IdentityResource(chain, identity)
    return chain


def build_root(config: Config, runtime: Runtime) -> IResource:
    """The whole resource tree for C{config}."""
    sessions = SessionManager(
        secret=config.gate.secret,
        previous_secrets=config.gate.previous_secrets,
        ttl=config.gate.session_ttl,
        clock=runtime.clock,
        revocations=runtime.revocations,
    )
    runtime.throttle.config = config.gate.throttle
    theme_css = read_text(config.theme.css_file)
    context = GateContext(
        gate=config.gate,
        sessions=sessions,
        verifier=PinVerifier(config.gate.pin_hash, runtime.run_in_thread),
        throttle=runtime.throttle,
        trusted=config.server.trusted_proxies,
        clock=runtime.clock,
        started=runtime.started,
        theme_css=lambda: theme_css,
    )
    pages = GatePages(context).resource()

    def site_root(
        upstream: UpstreamConfig, identity: Sequence[tuple[str, str]], public_paths: Sequence[str]
    ) -> IResource:
        protected = AuthResource(
            _protected_chain(upstream, identity, config, runtime), context, public_paths
        )
        return SiteRoot(config.gate.prefix, pages, protected)

    default = (
        site_root(config.upstream, config.identity_headers, ())
        if config.upstream is not None
        else None
    )
    if not config.sites:
        assert default is not None
        return default
    sites = [
        (site, site_root(site.upstream, site.identity_headers, site.public_paths))
        for site in config.sites
    ]
    return HostRouter(sites, default, config.server.trusted_proxies)


def state_path(config: Config, name: str) -> str:
    """A file inside C{state_dir}."""
    return os.path.join(config.server.state_dir, name)
