# -*- test-case-name: tests.test_forwarding -*-
"""
Who the client really is, and how it reached us.

The one place that decides whether X-Forwarded-* / X-Real-IP may be believed
(only from C{server.trusted_proxies}).  Logs, the throttle, cookie flags and
the headers sent upstream all ask here, so a forged header from an untrusted
address is ignored everywhere at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.iweb import IRequest

from pingated.config import IPNetwork


def _header(request: IRequest, name: bytes) -> str | None:
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    return ",".join(v.decode("latin-1") for v in values)


def peer_ip(request: IRequest) -> str:
    """The address of the TCP peer (or C{"unix"} for a UNIX socket)."""
    address = request.getClientAddress()
    if isinstance(address, IPv4Address | IPv6Address):
        host = address.host
        # IPv4-mapped IPv6 peers are logged and matched as plain IPv4.
        if host.startswith("::ffff:") and "." in host:
            return host[7:]
        return host
    if isinstance(address, UNIXAddress):
        return "unix"
    return "unknown"


def is_trusted(ip: str, trusted: Sequence[IPNetwork]) -> bool:
    """True when C{ip} lies in one of the C{trusted} networks."""
    if ip == "unix":
        # A UNIX socket can only be reached by local processes (a front proxy).
        return True
    networks = tuple(trusted)
    key = (ip, id(networks))
    cached = _TRUST_CACHE.get(key)
    if cached is not None and cached[0] is networks:
        return cached[1]
    result = _in_networks(ip, networks)
    if len(_TRUST_CACHE) >= 4096:
        _TRUST_CACHE.clear()
    _TRUST_CACHE[key] = (networks, result)
    return result


# Asked several times per proxied request (client address, scheme, host,
# X-Forwarded-For hops): parsing the address, or even hashing the networks
# for a cache key, showed in profiles.  Keyed by the networks' identity; the
# entry keeps them alive, so an id cannot be reused while it is cached.
_TRUST_CACHE: dict[tuple[str, int], tuple[tuple[IPNetwork, ...], bool]] = {}


def _in_networks(ip: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def _valid_ip(text: str) -> str | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def client_ip(request: IRequest, trusted: Sequence[IPNetwork]) -> str:
    """
    The visitor's address: the peer, unless the peer is a trusted proxy.

    X-Forwarded-For is walked from the right, skipping trusted hops, so a
    client cannot prepend a fake address to the list a real proxy appends to.
    """
    peer = peer_ip(request)
    if not is_trusted(peer, trusted):
        return peer
    forwarded_for = _header(request, b"x-forwarded-for")
    if forwarded_for:
        hops = [_valid_ip(hop) for hop in forwarded_for.split(",")]
        for hop in reversed(hops):
            if hop is None:
                break
            if not is_trusted(hop, trusted):
                return hop
        leftmost = hops[0] if hops else None
        if leftmost and all(h is not None for h in hops):
            return leftmost
    real_ip = _header(request, b"x-real-ip")
    if real_ip:
        valid = _valid_ip(real_ip)
        if valid:
            return valid
    return peer


def request_scheme(request: IRequest, trusted: Sequence[IPNetwork]) -> str:
    """C{"https"} when the client reached us (or a trusted front proxy) over TLS."""
    if request.isSecure():
        return "https"
    if is_trusted(peer_ip(request), trusted):
        proto = _header(request, b"x-forwarded-proto")
        if proto and proto.split(",")[0].strip().lower() in ("http", "https"):
            return proto.split(",")[0].strip().lower()
    return "http"


def request_host(request: IRequest, trusted: Sequence[IPNetwork]) -> str:
    """The Host the client used (with port), from a trusted X-Forwarded-Host if present."""
    if is_trusted(peer_ip(request), trusted):
        forwarded_host = _header(request, b"x-forwarded-host")
        if forwarded_host:
            return forwarded_host.split(",")[0].strip()
    host = _header(request, b"host")
    return host.strip() if host else ""


def host_without_port(host: str) -> str:
    """C{"example.com:8443"} -> C{"example.com"}; C{"[::1]:80"} -> C{"[::1]"}."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0] if ":" in host else host
