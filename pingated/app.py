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
from pingated.llm import LlmResource, LlmRoute
from pingated.metrics import DEFAULT_SITE, GateMetrics, UpstreamMetrics
from pingated.pins import PinVerifier
from pingated.proxy import ProxyResource
from pingated.responses import error_body
from pingated.sessions import RevocationStore, SessionManager
from pingated.theme import ThemeResource
from pingated.threads import RunInThread
from pingated.throttle import Throttle
from pingated.websocket import WebSocketBridge

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
    # Where argon2 runs (a bounded pool of its own); run_in_thread when None.
    verify_in_thread: RunInThread | None = None
    # Prometheus counters; None in tests that do not look at them.
    metrics: GateMetrics | None = None

    _verifier: PinVerifier | None = attrs.field(default=None, init=False)

    def pin_verifier(self, pin_hash: str) -> PinVerifier:
        """
        One verifier for the life of the process, so its bound on PIN checks in
        flight holds across SIGHUP rebuilds; a reload only changes the hash.
        """
        if self._verifier is None:
            self._verifier = PinVerifier(pin_hash, self.verify_in_thread or self.run_in_thread)
        else:
            self._verifier.pin_hash = pin_hash
        return self._verifier

    def upstream_metrics(self, upstream: UpstreamConfig) -> UpstreamMetrics | None:
        """The proxy's latency/error counters for C{upstream}, if metrics are kept."""
        return self.metrics.upstream(upstream.url) if self.metrics is not None else None


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
        self.sites = [site for site, _ in sites]
        self.resources = {site.host: resource for site, resource in sites}
        self.default = default
        self.trusted = tuple(trusted)

    def pick(self, host: str) -> IResource | None:
        """The resource serving C{host} (no port), or the default."""
        site = match_site(self.sites, host)
        return self.resources[site.host] if site is not None else self.default

    def render(self, request: IRequest) -> Any:
        """Route by Host; 404 when nothing serves it."""
        host = host_without_port(request_host(request, self.trusted))
        target = self.pick(host)
        if target is None:
            return error_body(request, 404, "Not Found", "unknown host")
        return target.render(request)


class UnknownHost(Resource):
    """What a host no [[site]] serves gets when there is no [upstream]: 404."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: IRequest) -> bytes:
        """A small 404; says nothing about which hosts exist."""
        return error_body(request, 404, "Not Found", "unknown host")


def match_site(sites: Sequence[SiteConfig], host: str) -> SiteConfig | None:
    """
    The site serving C{host} (no port): an exact name first, then the longest
    matching wildcard, the same order L{HostRouter} uses.
    """
    host = host.lower().rstrip(".")
    for site in sites:
        if site.host == host:
            return site
    wildcards = [site for site in sites if site.host.startswith("*.") and site.matches(host)]
    if wildcards:
        return max(wildcards, key=lambda site: len(site.host))
    return None


def identity_for_host(config: Config, host: str) -> Sequence[tuple[str, str]]:
    """The identity headers for requests to C{host}: its site's, else the global ones."""
    site = match_site(config.sites, host)
    return site.identity_headers if site is not None else config.identity_headers


def site_labeller(config: Config) -> Callable[[IRequest], str]:
    """
    How metrics name the site a request went to: its [[site]] host, or
    C{"default"} -- never the raw Host header, so series stay bounded.
    """
    sites = config.sites
    trusted = config.server.trusted_proxies
    if not sites:
        return lambda request: DEFAULT_SITE

    def label(request: IRequest) -> str:
        site = match_site(sites, host_without_port(request_host(request, trusted)))
        return site.host if site is not None else DEFAULT_SITE

    return label


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
    css: str = "",
) -> tuple[IResource, IResource]:
    """
    The wrappers between the gate and the proxy, for a session and for an
    anonymous request on a public path (identity headers stripped, not set).
    """
    websocket = WebSocketBridge(
        runtime.reactor, upstream, config.server.trusted_proxies, config.websocket
    )
    if runtime.metrics is not None:
        runtime.metrics.watch_websockets(websocket)
    proxy = ProxyResource(
        runtime.agent_for(upstream),
        upstream,
        config.server.trusted_proxies,
        runtime.clock,
        websocket=websocket,
        metrics=runtime.upstream_metrics(upstream),
    )
    chain: IResource = proxy
    if css:
        chain = ThemeResource(chain, css)
    if not identity:
        return chain, chain
    return IdentityResource(chain, identity), IdentityResource(chain, identity, anonymous=True)


def _llm_resource(config: Config, context: GateContext, runtime: Runtime) -> IResource | None:
    """The LLM route (contract 4a) with its own proxy to C{llm.upstream}, if enabled."""
    if not config.llm.enabled:
        return None
    upstream = UpstreamConfig(url=config.llm.upstream)
    proxy = ProxyResource(
        runtime.agent_for(upstream),
        upstream,
        config.server.trusted_proxies,
        runtime.clock,
        metrics=runtime.upstream_metrics(upstream),
    )
    return LlmResource(config.llm, context, proxy)


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
    if runtime.metrics is not None:
        runtime.metrics.configure(site_labeller(config))
    theme_css = read_text(config.theme.css_file)
    context = GateContext(
        gate=config.gate,
        sessions=sessions,
        verifier=runtime.pin_verifier(config.gate.pin_hash),
        throttle=runtime.throttle,
        trusted=config.server.trusted_proxies,
        clock=runtime.clock,
        started=runtime.started,
        theme_css=lambda: theme_css,
        identity_for=lambda host: identity_for_host(config, host),
        metrics=runtime.metrics,
        metrics_config=config.metrics,
    )
    pages = GatePages(context).resource()
    llm = _llm_resource(config, context, runtime)

    def site_root(
        upstream: UpstreamConfig,
        identity: Sequence[tuple[str, str]],
        public_paths: Sequence[str],
        css: str = theme_css,
    ) -> IResource:
        chain, anonymous = _protected_chain(upstream, identity, config, runtime, css)
        protected: IResource = AuthResource(chain, context, public_paths, anonymous)
        if llm is not None:
            # In front of the normal chain: it checks the session itself and
            # answers 401 JSON, never the login redirect.
            protected = LlmRoute(config.llm.path, llm, protected)
        return SiteRoot(config.gate.prefix, pages, protected)

    # With no [upstream], an unknown host still gets the gate's own pages
    # (a central login host need not be a [[site]]); everything else is 404.
    default = (
        site_root(config.upstream, config.identity_headers, ())
        if config.upstream is not None
        else SiteRoot(config.gate.prefix, pages, UnknownHost())
    )
    if not config.sites:
        return default
    sites = [
        (
            site,
            site_root(
                site.upstream,
                site.identity_headers,
                site.public_paths,
                read_text(site.css_file) if site.css_file else theme_css,
            ),
        )
        for site in config.sites
    ]
    return HostRouter(sites, default, config.server.trusted_proxies)
