# -*- test-case-name: tests.test_gate -*-
"""
The gate: its own pages (Klein) and the authentication wrapper.

L{GatePages} serves login, logout and health under C{gate.prefix};
L{AuthResource} wraps whatever sits behind the gate and lets a request
through only with a valid session cookie (or on a configured public path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import attrs
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from pingated import __version__
from pingated.config import GateConfig, IPNetwork, MetricsConfig
from pingated.forwarding import client_ip, request_host, request_scheme
from pingated.headers import remove_cookie
from pingated.loginpage import (
    STATIC_ASSETS,
    LoginPageState,
    StaticAsset,
    asset_url,
    load_logo,
    render_login_page,
    serve_asset,
)
from pingated.metrics import GateMetrics, render_metrics
from pingated.pins import PinVerifier, VerifierBusy
from pingated.redirects import safe_next
from pingated.responses import json_body, wants_html
from pingated.sessions import Session, SessionManager
from pingated.throttle import Throttle
from pingated.verify import VERIFY_METHODS
from pingated.verify import verify as forward_auth

security_log = Logger(namespace="pingated.security")

# Applied to every page the gate serves itself: nothing may frame it, load
# scripts into it, or sniff it into something else.
SECURITY_HEADERS = (
    (
        b"Content-Security-Policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-store"),
)

ERROR_MESSAGES = {
    "pin": "Wrong PIN. Try again.",
    "busy": "The gate is busy. Try again in a moment.",
}


def session_cookie(request: IRequest, cookie_name: str) -> bytes | None:
    """The gate's cookie value from the request, if any."""
    return request.getCookie(cookie_name.encode("ascii"))  # type: ignore[no-any-return]


#: At most this many same-named gate cookies are checked per request.
MAX_SESSION_COOKIES = 8


def session_cookies(request: IRequest, cookie_name: str) -> list[bytes]:
    """
    Every value of the gate's cookie in the request, in order.

    A browser can hold several cookies of that name (a host-only one left
    from before C{cookie_domain} was set, one per domain or path) and sends
    them all; any one valid session must count, not just the last value.
    """
    name = cookie_name.encode("ascii")
    values = []
    for header in request.requestHeaders.getRawHeaders(b"cookie", []):
        for part in header.split(b";"):
            key, sep, value = part.partition(b"=")
            if sep and key.strip() == name:
                values.append(value.strip())
    return values[:MAX_SESSION_COOKIES]


@attrs.define(slots=False)
class GateContext:
    """Everything the gate's pages and wrapper share for one configuration."""

    gate: GateConfig
    sessions: SessionManager
    verifier: PinVerifier
    throttle: Throttle
    trusted: Sequence[IPNetwork]
    clock: IReactorTime
    started: float
    theme_css: Callable[[], str] = lambda: ""
    extra_pages: dict[str, Any] = attrs.field(factory=dict)
    # Forward-auth answers carry the identity headers of the site the original
    # host belongs to; app.build_root supplies the lookup (host without port).
    identity_for: Callable[[str], Sequence[tuple[str, str]]] = lambda host: ()
    # Prometheus counters (pingated.metrics); None: nothing counted, no page.
    metrics: GateMetrics | None = None
    metrics_config: MetricsConfig = attrs.field(factory=MetricsConfig)

    def count_login(self, result: str) -> None:
        """Count one login attempt's result (ok, failed, throttled, busy)."""
        if self.metrics is not None:
            self.metrics.login(result)

    def current_session(self, request: IRequest) -> Session | None:
        """The valid session this request carries (any of its gate cookies), or None."""
        for value in session_cookies(request, self.gate.cookie_name):
            session = self.sessions.check(value)
            if session is not None:
                return session
        return None

    def login_location(self, request: IRequest, next_target: str) -> str:
        """Where to send a visitor who must log in, carrying C{next}."""
        if self.gate.login_url:
            separator = "&" if "?" in self.gate.login_url else "?"
            return f"{self.gate.login_url}{separator}{urlencode({'next': next_target})}"
        return f"{self.gate.prefix}/login?{urlencode({'next': next_target})}"

    def strip_gate_cookie(self, request: IRequest) -> None:
        """Remove the gate's own cookie so nothing behind the gate ever sees it."""
        remove_cookie(request.requestHeaders, self.gate.cookie_name.encode("ascii"))

    def is_https(self, request: IRequest) -> bool:
        """Whether the visitor reached us over TLS (so cookies get Secure)."""
        return request_scheme(request, self.trusted) == "https"

    def set_session_cookie(self, request: Request, value: str, max_age: int) -> None:
        """Set (or with C{max_age=0} clear) the session cookie per contract section 5."""
        request.addCookie(
            self.gate.cookie_name.encode("ascii"),
            value.encode("ascii"),
            max_age=str(max_age).encode("ascii"),
            path=b"/",
            domain=self.gate.cookie_domain.encode("ascii") or None,
            secure=self.is_https(request),
            httpOnly=True,
            sameSite="lax",
        )


def _add_security_headers(request: IRequest, https: bool) -> None:
    # Strict-Transport-Security is added by GateHeaders, which knows the config.
    for name, value in SECURITY_HEADERS:
        request.responseHeaders.setRawHeaders(name, [value])
    request.responseHeaders.setRawHeaders(b"server", [b"pingated"])


def hsts_value(gate: GateConfig) -> bytes | None:
    """The Strict-Transport-Security value for C{gate}, or None when switched off."""
    if not gate.hsts:
        return None
    value = f"max-age={gate.hsts_max_age}"
    if gate.hsts_include_subdomains:
        value += "; includeSubDomains"
    return value.encode("ascii")


class GateHeaders(Resource):
    """
    Puts the security headers on every answer under the gate's prefix.

    Pages added later get them without remembering to; HSTS is sent only to
    visitors who came over HTTPS (a plain-HTTP answer cannot set it anyway,
    and a TLS-less test setup must not be pinned to HTTPS).
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, context: GateContext) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.wrapped = wrapped
        self.context = context

    def render(self, request: IRequest) -> Any:
        """Add the headers, then let the gate's pages answer."""
        _add_security_headers(request, False)
        hsts = hsts_value(self.context.gate)
        if hsts is not None and self.context.is_https(request):
            request.responseHeaders.setRawHeaders(b"strict-transport-security", [hsts])
        return self.wrapped.render(request)


def _arg(request: IRequest, name: bytes) -> str:
    values = request.args.get(name) if request.args else None
    if not values:
        return ""
    try:
        return values[0].decode("utf-8")  # type: ignore[no-any-return]
    except UnicodeDecodeError:
        return ""


class GatePages:
    """Login, logout and health, mounted under C{gate.prefix} on every site."""

    app = Klein()

    def __init__(self, context: GateContext) -> None:
        self.context = context
        self.logo: StaticAsset | None = None
        try:
            # Read once per (re)build: no file I/O on the request path.
            self.logo = load_logo(context.gate.logo_file)
        except OSError as e:
            Logger(namespace="pingated.gate").error(
                "cannot read gate.logo_file: {reason}", reason=e.strerror
            )

    def resource(self) -> IResource:
        """The Klein resource to mount, behind the security headers."""
        return GateHeaders(self.app.resource(), self.context)

    def _next_for(self, request: IRequest, raw: str) -> str:
        host = request_host(request, self.context.trusted)
        return safe_next(raw, host, self.context.gate.cookie_domain)

    def _login_page(self, request: IRequest, next_target: str, error: str, status: int) -> bytes:
        _add_security_headers(request, self.context.is_https(request))
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        state = LoginPageState(
            action=f"{self.context.gate.prefix}/login",
            next=next_target,
            title=self.context.gate.title,
            error=error,
            extra_css=self.context.theme_css(),
            static_base=f"{self.context.gate.prefix}/static",
            logo_url=(
                asset_url(self.context.gate.prefix, "logo", self.logo) if self.logo else ""
            ),
        )
        return render_login_page(state)

    @app.route("/login", methods=["GET", "HEAD"])
    def login_form(self, request: IRequest) -> bytes:
        """The PIN page; C{?error=} shows why the last attempt failed."""
        next_target = self._next_for(request, _arg(request, b"next"))
        error = ERROR_MESSAGES.get(_arg(request, b"error"), "")
        ip = client_ip(request, self.context.trusted)
        retry = self.context.throttle.retry_after(ip)
        if retry is not None:
            error = _throttled_message(retry)
        return self._login_page(request, next_target, error, 200)

    @app.route("/login", methods=["POST"])
    def login_submit(self, request: Request) -> bytes | Deferred[bytes]:
        """Check the PIN (off the reactor) and start a session when it is right."""
        context = self.context
        next_target = self._next_for(request, _arg(request, b"next"))
        ip = client_ip(request, context.trusted)
        retry = context.throttle.retry_after(ip)
        if retry is not None:
            # Locked out: the PIN is not even checked.
            security_log.info(
                "pingated[security] throttled ip={ip} retry_after={retry}", ip=ip, retry=retry
            )
            context.count_login("throttled")
            request.setHeader(b"retry-after", str(retry).encode("ascii"))
            if wants_html(request) or _is_form(request):
                return self._login_page(request, next_target, _throttled_message(retry), 429)
            return json_body(request, 429, {"error": "too many attempts", "retry_after": retry})
        try:
            checking = context.verifier.verify(_arg(request, b"pin"))
        except VerifierBusy:
            context.count_login("busy")
            request.setHeader(b"retry-after", b"1")
            _add_security_headers(request, context.is_https(request))
            return self._login_page(request, next_target, ERROR_MESSAGES["busy"], 503)
        # The running check counts against the limits until it ends, so a
        # burst of concurrent guesses cannot overshoot them.
        context.throttle.begin(ip)

        def checked(ok: bool) -> bytes:
            _add_security_headers(request, context.is_https(request))
            if ok:
                context.throttle.record_success(ip)
                _, value = context.sessions.issue()
                context.set_session_cookie(request, value, context.gate.session_ttl)
                security_log.info("pingated[security] login-ok ip={ip}", ip=ip)
                context.count_login("ok")
                return _see_other(request, next_target)
            path = request.path.decode("latin-1")
            security_log.info(
                "pingated[security] login-failed ip={ip} path={path}", ip=ip, path=path
            )
            context.count_login("failed")
            locked = context.throttle.record_failure(ip)
            if locked is not None:
                security_log.info(
                    "pingated[security] throttled ip={ip} retry_after={retry}",
                    ip=ip,
                    retry=locked,
                )
            query = urlencode({"next": next_target, "error": "pin"})
            return _see_other(request, f"{context.gate.prefix}/login?{query}")

        def failed(failure: Failure) -> bytes:
            security_log.failure("PIN check failed", failure)
            return json_body(request, 500, {"error": "internal error"})

        def not_checked(failure: Failure) -> Failure:
            # A check that blew up still ends its attempt (and counts as wrong).
            context.throttle.record_failure(ip)
            return failure

        return checking.addErrback(not_checked).addCallback(checked).addErrback(failed)

    @app.route("/logout", methods=["GET", "POST", "HEAD"])
    def logout(self, request: Request) -> bytes | Deferred[bytes]:
        """Clear the cookie and revoke the session so a copied cookie dies too."""
        context = self.context
        _add_security_headers(request, context.is_https(request))
        session = context.current_session(request)
        context.set_session_cookie(request, "", 0)
        location = f"{context.gate.prefix}/login"
        if session is None:
            return _see_other(request, location)
        security_log.info(
            "pingated[security] logout ip={ip}", ip=client_ip(request, context.trusted)
        )
        if context.metrics is not None:
            context.metrics.revoked()
        return context.sessions.revoke(session).addCallback(lambda _: _see_other(request, location))

    @app.route("/static/<name>", methods=["GET", "HEAD"])
    def static(self, request: IRequest, name: str) -> bytes:
        """The PIN page's script and styles: public, typed, cached for a year (URL has a hash)."""
        _add_security_headers(request, self.context.is_https(request))
        return serve_asset(request, STATIC_ASSETS.get(name))

    @app.route("/logo", methods=["GET", "HEAD"])
    def logo_image(self, request: IRequest) -> bytes:
        """The operator's C{gate.logo_file}, served like the static files (404 when unset)."""
        _add_security_headers(request, self.context.is_https(request))
        return serve_asset(request, self.logo)

    @app.route("/verify", methods=list(VERIFY_METHODS))
    def verify(self, request: IRequest) -> bytes:
        """Forward-auth for nginx, Traefik and Caddy (contract 3a); see L{pingated.verify}."""
        return forward_auth(self.context, request)

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> bytes:
        """Prometheus text format for C{metrics.allow} addresses; see L{pingated.metrics}."""
        context = self.context
        return render_metrics(request, context.metrics, context.metrics_config, context.trusted)

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        """Liveness for load balancers and monitors; reveals nothing sensitive."""
        uptime = int(self.context.clock.seconds() - self.context.started)
        return json_body(
            request, 200, {"status": "ok", "version": __version__, "uptime_seconds": uptime}
        )

    @app.handle_errors(Exception)
    def on_error(self, request: IRequest, failure: Failure) -> bytes:
        """Klein's own 404/405 and anything unexpected: small JSON, never a traceback."""
        from werkzeug.exceptions import HTTPException

        if failure.check(HTTPException):
            code = failure.value.code  # type: ignore[union-attr]
            return json_body(request, code, {"error": failure.value.name.lower()})  # type: ignore[union-attr]
        security_log.failure("error in gate page", failure)
        return json_body(request, 500, {"error": "internal error"})


def _is_form(request: IRequest) -> bool:
    ctype = b",".join(request.requestHeaders.getRawHeaders(b"content-type", []))
    return b"application/x-www-form-urlencoded" in ctype or b"multipart/form-data" in ctype


def _throttled_message(retry: int) -> str:
    minutes = max(1, (retry + 59) // 60)
    unit = "minute" if minutes == 1 else "minutes"
    return f"Too many attempts. Try again in {minutes} {unit}."


def _see_other(request: IRequest, location: str) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"location", location.encode("utf-8"))
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b""


class AuthResource(Resource):
    """
    Lets a request through to C{wrapped} only with a valid session.

    Without one, a browser navigation is redirected to the login page and
    anything else gets 401 JSON.  The gate's cookie is removed before the
    request goes further, so the upstream never sees it.
    """

    isLeaf = True

    def __init__(
        self,
        wrapped: IResource,
        context: GateContext,
        public_paths: Sequence[str] = (),
        anonymous: IResource | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.wrapped = wrapped
        self.context = context
        self.public_paths = tuple(public_paths)
        # Public paths reached without a session go here when given (a chain
        # that strips identity headers instead of setting them).
        self.anonymous = anonymous

    def render(self, request: IRequest) -> Any:
        """Check the cookie, strip it, then either pass on or refuse."""
        context = self.context
        session = context.current_session(request)
        self.context.strip_gate_cookie(request)
        if session is not None:
            return self.wrapped.render(request)
        if self._is_public(request.path):
            target = self.anonymous if self.anonymous is not None else self.wrapped
            return target.render(request)
        return self.refuse(request)

    def refuse(self, request: IRequest) -> bytes:
        """302 to the login page for navigations, 401 JSON for everything else."""
        context = self.context
        if context.gate.login_url:
            scheme = request_scheme(request, context.trusted)
            host = request_host(request, context.trusted)
            next_target = f"{scheme}://{host}{request.uri.decode('latin-1')}"
        else:
            next_target = request.uri.decode("latin-1")
        location = context.login_location(request, next_target)
        if wants_html(request) and not _is_upgrade(request):
            request.setResponseCode(302)
            request.setHeader(b"location", location.encode("utf-8"))
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b""
        login = location if context.gate.login_url else f"{context.gate.prefix}/login"
        return json_body(request, 401, {"error": "login required", "login": login})

    def _is_public(self, path: bytes) -> bool:
        if not self.public_paths:
            return False
        text = path.decode("latin-1")
        segments = text.split("/")
        # Dot segments or encoded dots could be normalised upstream into a
        # private path, so such a path is never public.
        if any(s in (".", "..") for s in segments) or "%2e" in text.lower() or "\\" in text:
            return False
        for public in self.public_paths:
            if text == public or text.startswith(public.rstrip("/") + "/"):
                return True
        return False


def _is_upgrade(request: IRequest) -> bool:
    return bool(request.requestHeaders.hasHeader(b"upgrade"))
