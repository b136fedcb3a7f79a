# -*- test-case-name: tests.test_llm -*-
"""
The LLM route: the master key is added by the gate, never seen by a browser.

A chat page served from anywhere the operator allows calls
C{<llm.path>/v1/chat/completions} with the visitor's session cookie
(C{credentials: 'include'}); pingated checks the session and the Origin,
replaces whatever Authorization the client sent with the configured master
key, and proxies to any OpenAI-compatible server (LiteLLM, Ollama's /v1,
vLLM).  Contract section 4a.

The pieces, each usable alone:

* L{LlmRoute} sends requests under C{llm.path} to the LLM resource and
  everything else to the site's normal chain;
* L{LlmResource} enforces Origin and session, answers CORS preflights
  itself, rewrites the request and hands it to its own proxy;
* L{LlmResponseFilter} gives the response the gate's CORS headers (the
  upstream's are dropped: its policy is not the gate's) and masks the master
  key should the upstream ever reflect it (an echo endpoint, a debugging
  error page), in headers and body alike, keeping Content-Length exact.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest, _IRequestEncoder
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from pingated.config import IPNetwork, LlmConfig
from pingated.forwarding import client_ip, request_host, request_scheme
from pingated.gate import GateContext
from pingated.headers import normalized
from pingated.responsefilter import install_response_filter
from pingated.responses import json_body

log = Logger(namespace="pingated.llm")

#: Methods a cross-origin page may use on the LLM route.
ALLOWED_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
#: How long a browser may cache a preflight answer (seconds).
PREFLIGHT_MAX_AGE = b"600"

#: Headers through which OpenAI-compatible servers accept a client key.  All
#: are removed so the master key is the only credential the upstream sees
#: (LiteLLM, for one, prefers some of these over Authorization).
CLIENT_KEY_HEADERS = frozenset(
    {
        b"authorization",
        b"x-api-key",
        b"api-key",
        b"x-litellm-api-key",
        b"x-goog-api-key",
    }
)

_TOKEN_LIST = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(?:\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")


def normalize_origin(origin: str) -> str | None:
    """
    C{scheme://host[:port]} in canonical form (lower case, default port
    dropped), or None for anything that is not a plain http(s) origin
    (C{null}, paths, credentials).
    """
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    suffix = f":{port}" if port is not None and port != default else ""
    return f"{scheme}://{host.lower()}{suffix}"


def own_origin(request: IRequest, trusted: Sequence[IPNetwork]) -> str | None:
    """The origin the visitor used to reach the gate (proxy headers only if trusted)."""
    host = request_host(request, trusted)
    if not host:
        return None
    return normalize_origin(f"{request_scheme(request, trusted)}://{host}")


def strip_prefix(uri: bytes, prefix: bytes) -> bytes | None:
    """
    C{/api/llm/v1/x?q} -> C{/v1/x?q} for C{prefix=/api/llm}; None when the
    URI is not under the prefix.  The query is kept byte for byte.
    """
    path, sep, query = uri.partition(b"?")
    if not path.startswith(b"/"):
        # Absolute-form request target ("POST http://host/api/llm/... HTTP/1.1").
        path = urlsplit(path).path or b"/"
    if path == prefix:
        rest = b"/"
    elif path.startswith(prefix + b"/"):
        rest = path[len(prefix) :]
    else:
        return None
    return rest + sep + query


def remove_client_keys(headers: Headers) -> None:
    """Drop every client-sent credential header, in any case or underscore spelling."""
    owned = {normalized(name) for name in CLIENT_KEY_HEADERS}
    for name, _ in list(headers.getAllRawHeaders()):
        if normalized(name) in owned:
            headers.removeHeader(name)


class KeyMasker:
    """
    Replaces a secret in a byte stream with asterisks of the same length.

    Only bytes that could be the start of the secret are held back between
    chunks (the longest tail that is a prefix of it), so an SSE event ending
    in a newline is never delayed.
    """

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.mask = b"*" * len(secret)
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """Mask one chunk; returns what may be sent now."""
        if not self.secret:
            return data
        data = (self._held + data).replace(self.secret, self.mask)
        hold = _prefix_overlap(data, self.secret)
        if hold:
            self._held = data[-hold:]
            return data[:-hold]
        self._held = b""
        return data

    def flush(self) -> bytes:
        """The stream ended: the held tail was not the secret after all."""
        held, self._held = self._held, b""
        return held


def _prefix_overlap(data: bytes, secret: bytes) -> int:
    """Length of the longest proper prefix of C{secret} that C{data} ends with."""
    longest = min(len(secret) - 1, len(data))
    if longest <= 0:
        return 0
    first = secret[:1]
    position = data.find(first, len(data) - longest)
    while position != -1:
        if secret.startswith(data[position:]):
            return len(data) - position
        position = data.find(first, position + 1)
    return 0


def mask_headers(headers: Headers, secret: bytes) -> None:
    """Mask the secret in every response header value (a reflecting upstream)."""
    if not secret:
        return
    mask = b"*" * len(secret)
    for name, values in list(headers.getAllRawHeaders()):
        if any(secret in value for value in values):
            headers.setRawHeaders(name, [value.replace(secret, mask) for value in values])


def set_cors_headers(headers: Headers, origin: bytes) -> None:
    """The gate's CORS answer for an allowed caller: that origin, with credentials."""
    headers.setRawHeaders(b"access-control-allow-origin", [origin])
    headers.setRawHeaders(b"access-control-allow-credentials", [b"true"])
    add_vary_origin(headers)


def add_vary_origin(headers: Headers) -> None:
    """Caches must not hand one origin's answer to another."""
    current = headers.getRawHeaders(b"vary", [])
    tokens = {t.strip().lower() for value in current for t in value.split(b",")}
    if b"origin" not in tokens and b"*" not in tokens:
        headers.setRawHeaders(b"vary", [*current, b"Origin"] if current else [b"Origin"])


def _drop_upstream_cors(headers: Headers) -> None:
    for name, _ in list(headers.getAllRawHeaders()):
        if name.lower().startswith(b"access-control-"):
            headers.removeHeader(name)


@implementer(_IRequestEncoder)
class LlmResponseFilter:
    """
    Applied to every answer on the LLM route, the gate's own and proxied ones:
    the gate's CORS headers replace the upstream's, and the master key is
    masked in headers and body.
    """

    def __init__(self, request: IRequest, origin: bytes | None, secret: bytes) -> None:
        self.request = request
        self.origin = origin
        self.secret = secret
        self._masker = KeyMasker(secret)
        self._started = False
        self._finished = False

    def _start(self) -> None:
        self._started = True
        headers = self.request.responseHeaders
        _drop_upstream_cors(headers)
        if self.origin is not None:
            set_cors_headers(headers, self.origin)
        mask_headers(headers, self.secret)

    def encode(self, data: bytes) -> bytes:
        """One body chunk on its way to the client."""
        if not self._started:
            self._start()
        if self._finished:
            return data
        return self._masker.feed(data)

    def finish(self) -> bytes:
        """Flush the few bytes held while they could have been the key."""
        if not self._started:
            self._start()
        self._finished = True
        return self._masker.flush()


class LlmResource(Resource):
    """
    The LLM route itself: Origin check, preflight, session, key injection.

    C{proxy} forwards to C{llm.upstream}; it receives the request with the
    route prefix removed from its URI, the gate's cookie removed, the
    client's credentials removed and C{Authorization: Bearer <master_key>}
    set.
    """

    isLeaf = True

    def __init__(self, config: LlmConfig, context: GateContext, proxy: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.context = context
        self.proxy = proxy
        self.prefix = config.path.rstrip("/").encode("ascii")
        self.secret = config.master_key.encode("latin-1")
        self.allowed = frozenset(
            o for o in (normalize_origin(a) for a in config.allowed_origins) if o is not None
        )

    def origin_allowed(self, request: IRequest, origin: str) -> bool:
        """The gate's own origin, or one listed in C{llm.allowed_origins}."""
        normal = normalize_origin(origin)
        if normal is None:
            return False
        return normal in self.allowed or normal == own_origin(request, self.context.trusted)

    def render(self, request: IRequest) -> Any:
        """Refuse, answer a preflight, or forward with the master key."""
        origins = request.requestHeaders.getRawHeaders(b"origin")
        origin: bytes | None = None
        if origins is not None:
            origin = origins[0] if len(origins) == 1 else b""
            if not self.origin_allowed(request, origin.decode("latin-1")):
                # Refused before anything else: nothing is forwarded, and no
                # CORS header lets the refused page read even this answer.
                log.info(
                    "llm: origin refused ip={ip}",
                    ip=client_ip(request, self.context.trusted),
                )
                return json_body(request, 403, {"error": "origin not allowed"})
        if request.method == b"OPTIONS":
            return self._preflight(request, origin)
        install_response_filter(request, LlmResponseFilter(request, origin, self.secret))
        session = self.context.current_session(request)
        self.context.strip_gate_cookie(request)
        if session is None:
            # Never a redirect: a script cannot follow one to a login page.
            login = self.context.gate.login_url or f"{self.context.gate.prefix}/login"
            return json_body(request, 401, {"error": "login required", "login": login})
        rewritten = strip_prefix(request.uri, self.prefix)
        if rewritten is None:  # pragma: no cover - LlmRoute only sends matching paths
            return json_body(request, 404, {"error": "not found"})
        request.uri = rewritten
        request.path = rewritten.partition(b"?")[0]
        headers = request.requestHeaders
        remove_client_keys(headers)
        headers.setRawHeaders(b"authorization", [b"Bearer " + self.secret])
        # Uncompressed from the upstream, so a reflected key can be masked.
        headers.setRawHeaders(b"accept-encoding", [b"identity"])
        return self.proxy.render(request)

    def _preflight(self, request: IRequest, origin: bytes | None) -> bytes:
        """Answered here: a preflight carries no cookie, so it cannot need a session."""
        headers = request.responseHeaders
        request.setResponseCode(204)
        if origin is None:
            # Not a CORS preflight at all; say what the route accepts.
            headers.setRawHeaders(b"allow", [ALLOWED_METHODS])
            return b""
        set_cors_headers(headers, origin)
        headers.setRawHeaders(b"access-control-allow-methods", [ALLOWED_METHODS])
        requested = b",".join(
            request.requestHeaders.getRawHeaders(b"access-control-request-headers", [])
        ).strip()
        if requested and _TOKEN_LIST.match(requested):
            headers.setRawHeaders(b"access-control-allow-headers", [requested])
        headers.setRawHeaders(b"access-control-max-age", [PREFLIGHT_MAX_AGE])
        return b""



class LlmRoute(Resource):
    """
    Puts the LLM route in front of a site's normal chain.

    Requests for C{path} or below go to C{llm}; everything else to
    C{fallback}, untouched.  Removing the route is removing this wrapper.
    """

    isLeaf = True

    def __init__(self, path: str, llm: IResource, fallback: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.prefix = path.rstrip("/").encode("ascii")
        self.llm = llm
        self.fallback = fallback

    def render(self, request: IRequest) -> Any:
        """Dispatch on the path prefix (whole segments only: C{/api/llmx} is not it)."""
        path = request.path
        if path == self.prefix or path.startswith(self.prefix + b"/"):
            return self.llm.render(request)
        return self.fallback.render(request)
