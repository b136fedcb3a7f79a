# -*- test-case-name: tests.test_config -*-
"""
The TOML configuration, parsed once into frozen attrs records.

Everything the daemon does is decided by these records; nothing else reads
the file.  Every problem is reported as one line naming the file, the key and
what is wrong, because that line is what an operator sees when the service
refuses to start.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
from argon2.exceptions import InvalidHashError

from pingated.units import UnitError, parse_duration, parse_size

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

LOOPBACK_NETWORKS = ("127.0.0.1/32", "::1/128")


class ConfigError(Exception):
    """
    A configuration problem the operator must fix.

    C{str()} is the single line printed on refusal: C{file: key: problem}.
    It never contains a secret's value.
    """

    def __init__(self, path: str, key: str, problem: str) -> None:
        # Key names and paths come from the file: escape anything that
        # would break the line (or a log line) apart.
        super().__init__(_one_line(f"{path}: {key}: {problem}"))
        self.path = path
        self.key = key
        self.problem = problem


def _one_line(text: str) -> str:
    """C{text} with control and line-separator characters backslash-escaped."""
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029"
        else c
        for c in text
    )


@attrs.frozen
class ThrottleConfig:
    """Limits on wrong PINs; see contract section 2 for why the defaults are what they are."""

    max_failures: int = 5
    window: int = 600
    lockout: int = 900
    global_max_failures: int = 50
    global_window: int = 3600


@attrs.frozen
class ServerConfig:
    """Where the gate listens and whom it believes about client addresses."""

    listen: tuple[str, ...] = ("tcp:3060:interface=127.0.0.1",)
    listen_tls: tuple[str, ...] = ()
    redirect_http: tuple[str, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = attrs.field(
        factory=lambda: tuple(ipaddress.ip_network(n) for n in LOOPBACK_NETWORKS)
    )
    state_dir: str = "state"
    header_timeout: int = 30


@attrs.frozen(repr=False)
class GateConfig:
    """The PIN, the session cookie and where the gate's own pages live."""

    pin_hash: str
    secret: bytes
    previous_secrets: tuple[bytes, ...] = ()
    cookie_name: str = "pingated"
    cookie_domain: str = ""
    session_ttl: int = 30 * 86400
    prefix: str = "/.pingated"
    login_url: str = ""
    title: str = "Sign in"
    logo_file: str = ""
    throttle: ThrottleConfig = attrs.field(factory=ThrottleConfig)
    # Strict-Transport-Security on the gate's pages, sent only over HTTPS.
    hsts: bool = True
    hsts_max_age: int = 365 * 86400
    hsts_include_subdomains: bool = False

    def __repr__(self) -> str:
        # Secrets never reach logs or tracebacks through a repr.
        return f"GateConfig(cookie_name={self.cookie_name!r}, prefix={self.prefix!r}, ...)"


@attrs.frozen
class UpstreamConfig:
    """The application behind the gate and how patiently to talk to it."""

    url: str
    preserve_host: bool = False
    connect_timeout: int = 10
    idle_timeout: int = 300
    max_request_body: int = 100 * 1024**2
    ca_file: str = ""


@attrs.frozen(repr=False)
class LlmConfig:
    """The optional LLM route whose master key is injected server-side."""

    enabled: bool = False
    path: str = "/api/llm"
    upstream: str = "http://127.0.0.1:8008"
    master_key: str = ""
    allowed_origins: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"LlmConfig(enabled={self.enabled!r}, path={self.path!r}, upstream={self.upstream!r})"
        )


@attrs.frozen
class WebSocketConfig:
    """Who may open WebSockets through the gate and how large one message may be."""

    allowed_origins: tuple[str, ...] = ()
    max_message_size: int = 16 * 1024**2


@attrs.frozen
class ThemeConfig:
    """CSS injected into upstream HTML pages and the login page."""

    css_file: str = ""


@attrs.frozen
class MetricsConfig:
    """Whether C{<prefix>/metrics} exists and who may read it."""

    enabled: bool = True
    allow: tuple[IPNetwork, ...] = attrs.field(
        factory=lambda: tuple(ipaddress.ip_network(n) for n in LOOPBACK_NETWORKS)
    )


@attrs.frozen
class LogConfig:
    """How the daemon logs: twistd's text lines (default) or JSON lines, and access lines."""

    format: str = "text"
    access_log: bool = False


@attrs.frozen
class TlsCertificate:
    """One certificate chain and key for the SNI set of C{listen_tls}."""

    cert_file: str
    key_file: str


@attrs.frozen
class AcmeConfig:
    """
    Certificates obtained from an ACME CA (Let's Encrypt, pebble) with HTTP-01.

    Configuring it means agreeing to the CA's terms of service.
    """

    directory: str
    hosts: tuple[str, ...]
    email: str = ""
    ca_file: str = ""
    renew_before: int = 30 * 86400
    check_interval: int = 12 * 3600


@attrs.frozen
class SiteConfig:
    """One application chosen by the request's Host."""

    host: str
    upstream: UpstreamConfig
    identity_headers: tuple[tuple[str, str], ...] = ()
    css_file: str = ""
    public_paths: tuple[str, ...] = ()

    def matches(self, host: str) -> bool:
        """Exact names match themselves; C{*.example.com} matches any deeper name."""
        host = host.lower()
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


@attrs.frozen(repr=False)
class Config:
    """The whole, validated configuration of one gate."""

    path: str
    server: ServerConfig
    gate: GateConfig
    upstream: UpstreamConfig | None
    identity_headers: tuple[tuple[str, str], ...] = ()
    llm: LlmConfig = attrs.field(factory=LlmConfig)
    theme: ThemeConfig = attrs.field(factory=ThemeConfig)
    websocket: WebSocketConfig = attrs.field(factory=WebSocketConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    tls_certificates: tuple[TlsCertificate, ...] = ()
    tls_min_version: str = "1.2"
    acme: AcmeConfig | None = None
    sites: tuple[SiteConfig, ...] = ()

    def __repr__(self) -> str:
        return f"Config(path={self.path!r})"

    def summary(self) -> str:
        """A secret-free description for C{check-config}."""
        lines = [f"{self.path}: OK"]
        lines.append("  listen: " + (", ".join(self.server.listen) or "(none)"))
        if self.server.listen_tls:
            lines.append("  listen_tls: " + ", ".join(self.server.listen_tls))
        if self.server.redirect_http:
            lines.append("  redirect_http: " + ", ".join(self.server.redirect_http))
        for cert in self.tls_certificates:
            lines.append(f"  tls certificate: {cert.cert_file}")
        if self.acme is not None:
            lines.append(f"  tls acme: {', '.join(self.acme.hosts)} from {self.acme.directory}")
        if self.server.listen_tls or self.tls_certificates:
            lines.append(f"  tls min_version: {self.tls_min_version}")
        lines.append(f"  upstream: {self.upstream.url if self.upstream else '(none)'}")
        for site in self.sites:
            lines.append(f"  site {site.host} -> {site.upstream.url}")
        lines.append(f"  gate prefix: {self.gate.prefix}, cookie: {self.gate.cookie_name}")
        lines.append(f"  session_ttl: {self.gate.session_ttl}s")
        if self.gate.cookie_domain:
            lines.append(f"  cookie_domain: {self.gate.cookie_domain}")
        if self.llm.enabled:
            lines.append(f"  llm: {self.llm.path} -> {self.llm.upstream}")
        if self.theme.css_file:
            lines.append(f"  theme: {self.theme.css_file}")
        lines.append(f"  state_dir: {self.server.state_dir}")
        return "\n".join(lines)


class _Reader:
    """Reads one TOML table, remembering its dotted path for error messages."""

    def __init__(self, path: str, base_dir: str, table: Mapping[str, Any], where: str) -> None:
        self.path = path
        self.base_dir = base_dir
        self.table = table
        self.where = where
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def has(self, name: str) -> bool:
        return name in self.table

    def get(self, name: str, kind: type[T], default: T) -> T:
        self.seen.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if kind is int and isinstance(value, bool):
            raise self.error(name, "must be an integer")
        if isinstance(value, str) and "\x00" in value:
            # Never meaningful, and file APIs raise ValueError on it.
            raise self.error(name, "must not contain NUL characters")
        if not isinstance(value, kind):
            raise self.error(name, f"must be {_kind_name(kind)}")
        return value

    def convert(self, name: str, default: T, converter: Callable[[object], T]) -> T:
        self.seen.add(name)
        if name not in self.table:
            return default
        try:
            return converter(self.table[name])
        except (UnitError, ValueError) as e:
            raise self.error(name, str(e)) from None

    def strings(self, name: str, default: Sequence[str] = ()) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        if not all(isinstance(v, str) for v in value):
            raise self.error(name, "must be a list of strings")
        if any("\x00" in v for v in value):
            raise self.error(name, "must not contain NUL characters")
        return tuple(value)

    def table_of(self, name: str) -> _Reader:
        value = self.get(name, dict, {})
        return _Reader(self.path, self.base_dir, value, self.key(name))

    def secret(self, name: str, required: bool) -> str:
        """Inline C{name = "..."} or C{name_file = "/path"} (first line, trimmed)."""
        inline = self.get(name, str, "")
        file_name = self.get(name + "_file", str, "")
        if inline and file_name:
            raise self.error(name, f"give either {name} or {name}_file, not both")
        if file_name:
            resolved = self.resolve(file_name)
            try:
                with open(resolved, encoding="utf-8") as f:
                    inline = f.readline().strip()
            except OSError as e:
                raise self.error(name + "_file", f"cannot read {resolved}: {e.strerror}") from None
            except UnicodeDecodeError:
                raise self.error(name + "_file", f"{resolved} is not UTF-8 text") from None
            if not inline:
                raise self.error(name + "_file", f"{resolved} is empty")
        if required and not inline:
            raise self.error(name, f"is required (set {name} or {name}_file)")
        return inline

    def resolve(self, file_name: str) -> str:
        """Relative paths are relative to the config file, like nginx's include."""
        if not file_name:
            return ""
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(file_name)))

    def check_unknown(self) -> None:
        for name in self.table:
            if name not in self.seen:
                raise self.error(name, "unknown key")


def _kind_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }.get(kind, kind.__name__)


def _networks(reader: _Reader, name: str, default: Sequence[str]) -> tuple[IPNetwork, ...]:
    result = []
    for text in reader.strings(name, default):
        try:
            result.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise reader.error(name, f"{text!r} is not an address or CIDR") from None
    return tuple(result)


def _check_endpoints(reader: _Reader, name: str, endpoints: Sequence[str]) -> None:
    from twisted.internet.endpoints import serverFromString

    class _NoReactor:
        """Endpoint parsing only stores the reactor; nothing is listened on."""

    for description in endpoints:
        if description.startswith("systemd:"):
            problem = _systemd_endpoint_problem(description)
            if problem:
                raise reader.error(
                    name, f"{description!r} is not a valid endpoint string ({problem})"
                )
            continue
        try:
            serverFromString(_NoReactor(), description)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise reader.error(
                name, f"{description!r} is not a valid endpoint string ({reason})"
            ) from None


def _systemd_endpoint_problem(description: str) -> str:
    """
    Check a socket-activation string (C{systemd:domain=INET:index=0}) by its
    syntax only: parsing it for real needs the sockets systemd passes, which
    C{check-config} (or anything but the service itself) never has.
    """
    args = dict(part.partition("=")[::2] for part in description.split(":")[1:])
    if args.get("domain") not in ("INET", "INET6", "UNIX"):
        return "domain must be INET, INET6 or UNIX"
    if ("index" in args) == ("name" in args) or set(args) - {"domain", "index", "name"}:
        return "give domain and exactly one of index or name"
    if "index" in args and not args["index"].isdigit():
        return "index must be a number"
    return ""


def _check_url(reader: _Reader, name: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.error(name, f"{url!r} must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018  (validates the port)
    except ValueError:
        raise reader.error(name, f"{url!r} has an invalid port") from None
    return url.rstrip("/") if parts.path in ("", "/") else url


def _header_pairs(reader: _Reader, name: str) -> tuple[tuple[str, str], ...]:
    table = reader.get(name, dict, {})
    pairs = []
    for key, value in table.items():
        if not isinstance(value, str):
            raise reader.error(f"{name}.{key}", "must be a string")
        if not key or any(c in key for c in " :\r\n\t") or any(c in value for c in "\r\n"):
            raise reader.error(f"{name}.{key}", "is not a valid header")
        pairs.append((key, value))
    return tuple(pairs)


def _read_upstream(reader: _Reader, url_key: str) -> UpstreamConfig:
    url = reader.get(url_key, str, "")
    if not url:
        raise reader.error(url_key, "is required")
    return UpstreamConfig(
        url=_check_url(reader, url_key, url),
        preserve_host=reader.get("preserve_host", bool, False),
        connect_timeout=reader.convert("connect_timeout", 10, parse_duration),
        idle_timeout=reader.convert("idle_timeout", 300, parse_duration),
        max_request_body=reader.convert("max_request_body", 100 * 1024**2, parse_size),
        ca_file=reader.resolve(reader.get("ca_file", str, "")),
    )


def _base64_min(text: str, min_bytes: int) -> bool:
    """True for unpadded base64 (as argon2 encodes salt and tag) of at least C{min_bytes}."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        return False
    return len(raw) >= min_bytes


# The gate's own path: plain ASCII segments (it is matched byte for byte).
_PREFIX = re.compile(r"^(?:/[A-Za-z0-9._~-]+)+$")
# A cookie name: an RFC 6265 token, kept to the characters every client handles.
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# A cookie Domain: DNS labels, an optional leading dot, at least two labels.
_DOMAIN = re.compile(r"^\.?[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+$")
# A [[site]] host: a DNS name, or "*." followed by one.
_SITE_HOST = re.compile(r"^(?:\*\.)?[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9])?$")


def _read_gate(reader: _Reader) -> GateConfig:
    pin_hash = reader.secret("pin_hash", required=True)
    try:
        from argon2 import extract_parameters

        extract_parameters(pin_hash)
        # extract_parameters reads only the parameters: a mangled salt or
        # digest would pass and then no PIN could ever log in.
        salt, digest = pin_hash.split("$")[-2:]
        if not (_base64_min(salt, 8) and _base64_min(digest, 4)):
            raise ValueError("bad salt or digest")
    except (InvalidHashError, ValueError, TypeError):
        raise reader.error(
            "pin_hash", "is not a valid argon2 hash (make one with `pingated hash-pin`)"
        ) from None
    secret = reader.secret("secret", required=True).encode("utf-8")
    if len(secret) < 32:
        raise reader.error("secret", "must be at least 32 bytes")
    previous = reader.strings("previous_secrets")
    for old in previous:
        if len(old.encode("utf-8")) < 32:
            raise reader.error("previous_secrets", "every entry must be at least 32 bytes")
    prefix = reader.get("prefix", str, "/.pingated").rstrip("/")
    if not _PREFIX.match(prefix) or "/./" in prefix + "/" or "/../" in prefix + "/":
        raise reader.error("prefix", "must be a path like /.pingated")
    cookie_name = reader.get("cookie_name", str, "pingated")
    if not _COOKIE_NAME.match(cookie_name):
        raise reader.error("cookie_name", "is not a valid cookie name (letters, digits, -_.)")
    cookie_domain = reader.get("cookie_domain", str, "").lower()
    if cookie_domain and not _DOMAIN.match(cookie_domain):
        raise reader.error("cookie_domain", "is not a valid domain (like .example.com)")
    login_url = reader.get("login_url", str, "")
    if login_url:
        _check_url(reader, "login_url", login_url)
        login_host = (urlsplit(login_url).hostname or "").lower()
        domain = cookie_domain.lstrip(".")
        # The cookie the central login page sets must reach the apps it
        # sends people back to; outside cookie_domain it never would.
        if domain and not (login_host == domain or login_host.endswith("." + domain)):
            raise reader.error("login_url", f"host {login_host} is not inside gate.cookie_domain")
    ttl = reader.convert("session_ttl", 30 * 86400, parse_duration)
    if ttl <= 0:
        raise reader.error("session_ttl", "must be positive")
    throttle_reader = reader.table_of("throttle")
    throttle = ThrottleConfig(
        max_failures=throttle_reader.get("max_failures", int, 5),
        window=throttle_reader.convert("window", 600, parse_duration),
        lockout=throttle_reader.convert("lockout", 900, parse_duration),
        global_max_failures=throttle_reader.get("global_max_failures", int, 50),
        global_window=throttle_reader.convert("global_window", 3600, parse_duration),
    )
    throttle_reader.check_unknown()
    if throttle.max_failures < 1 or throttle.global_max_failures < 1:
        raise reader.error("throttle", "max_failures and global_max_failures must be >= 1")
    for name in ("window", "lockout", "global_window"):
        # A zero window or lockout would silently switch the protection off.
        if getattr(throttle, name) < 1:
            raise throttle_reader.error(name, "must be at least 1 second")
    return GateConfig(
        pin_hash=pin_hash,
        secret=secret,
        previous_secrets=tuple(p.encode("utf-8") for p in previous),
        cookie_name=cookie_name,
        cookie_domain=cookie_domain,
        session_ttl=ttl,
        prefix=prefix,
        login_url=login_url,
        title=reader.get("title", str, "Sign in"),
        logo_file=_check_logo(reader, reader.resolve(reader.get("logo_file", str, ""))),
        throttle=throttle,
        hsts=reader.get("hsts", bool, True),
        hsts_max_age=reader.convert("hsts_max_age", 365 * 86400, parse_duration),
        hsts_include_subdomains=reader.get("hsts_include_subdomains", bool, False),
    )


#: Image types accepted for C{gate.logo_file}, and how large it may be: the
#: PIN page must stay light on a phone.
LOGO_EXTENSIONS = (".svg", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".avif", ".ico")
MAX_LOGO_BYTES = 512 * 1024


def _check_logo(reader: _Reader, path: str) -> str:
    """A logo that cannot be served is refused at start, not discovered by visitors."""
    if not path:
        return ""
    if os.path.splitext(path)[1].lower() not in LOGO_EXTENSIONS:
        raise reader.error("logo_file", f"must be an image ({', '.join(LOGO_EXTENSIONS)})")
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except OSError as e:
        raise reader.error("logo_file", f"cannot read {path}: {e.strerror}") from None
    if size > MAX_LOGO_BYTES:
        raise reader.error("logo_file", f"{path} is larger than {MAX_LOGO_BYTES // 1024} KB")
    return path


def _read_server(reader: _Reader) -> ServerConfig:
    listen = reader.strings("listen", ["tcp:3060:interface=127.0.0.1"])
    listen_tls = reader.strings("listen_tls")
    redirect_http = reader.strings("redirect_http")
    _check_endpoints(reader, "listen", listen)
    _check_endpoints(reader, "listen_tls", listen_tls)
    _check_endpoints(reader, "redirect_http", redirect_http)
    if not (listen or listen_tls):
        raise reader.error("listen", "at least one endpoint is required")
    return ServerConfig(
        listen=listen,
        listen_tls=listen_tls,
        redirect_http=redirect_http,
        trusted_proxies=_networks(reader, "trusted_proxies", LOOPBACK_NETWORKS),
        state_dir=reader.resolve(reader.get("state_dir", str, "state")),
        header_timeout=reader.convert("header_timeout", 30, parse_duration),
    )


def _read_websocket(reader: _Reader) -> WebSocketConfig:
    origins = []
    for origin in reader.strings("allowed_origins"):
        parts = urlsplit(origin)
        try:
            parts.port  # noqa: B018  (validates the port)
        except ValueError:
            raise reader.error("allowed_origins", f"{origin!r} has an invalid port") from None
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
        ):
            raise reader.error(
                "allowed_origins", f"{origin!r} is not an origin like https://app.example.com"
            )
        origins.append(origin.rstrip("/"))
    max_message_size = reader.convert("max_message_size", 16 * 1024**2, parse_size)
    if max_message_size < 1024:
        raise reader.error("max_message_size", "must be at least 1KB")
    reader.check_unknown()
    return WebSocketConfig(allowed_origins=tuple(origins), max_message_size=max_message_size)


_ORIGIN = re.compile(r"^https?://[^/?#@\s]+$")


def _check_llm(reader: _Reader, llm: LlmConfig, gate: GateConfig) -> None:
    """The LLM route must not swallow the site or the gate's pages, nor carry a broken key."""
    if llm.path == "/" or llm.path == gate.prefix or llm.path.startswith(gate.prefix + "/"):
        raise reader.error("path", f"{llm.path!r} must be a path like /api/llm, not / or prefix")
    if any(c in llm.path for c in "?#% ") or not llm.path.isascii():
        raise reader.error("path", f"{llm.path!r} must be a plain path like /api/llm")
    if not llm.master_key.isascii() or not llm.master_key.isprintable() or " " in llm.master_key:
        # The key goes into a header; never repeat it in the message.
        raise reader.error("master_key", "must be printable ASCII without spaces")
    for origin in llm.allowed_origins:
        if not _ORIGIN.match(origin):
            raise reader.error(
                "allowed_origins", f"{origin!r} must be an origin like https://ai.example.com"
            )


def _check_css(reader: _Reader, path: str) -> str:
    """A theme that cannot be read is refused at start (and on SIGHUP), not mid-request."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
    except OSError as e:
        raise reader.error("css_file", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise reader.error("css_file", f"{path} is not UTF-8 text") from None
    return path


_ACME_HOST = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]*[a-z0-9]$"
)


def _read_certificate_entry(reader: _Reader) -> TlsCertificate:
    from pingated.tls import CertificateFileError, read_certificate

    cert = TlsCertificate(
        cert_file=reader.resolve(reader.get("cert_file", str, "")),
        key_file=reader.resolve(reader.get("key_file", str, "")),
    )
    if not cert.cert_file or not cert.key_file:
        raise reader.error("cert_file", "cert_file and key_file are both required")
    reader.check_unknown()
    try:
        read_certificate(cert.cert_file, cert.key_file)
    except CertificateFileError as e:
        raise reader.error(e.field, e.problem) from None
    return cert


def _read_acme(reader: _Reader) -> AcmeConfig:
    directory = reader.get("directory", str, "")
    if not directory:
        raise reader.error("directory", "is required (the ACME directory URL)")
    _check_url(reader, "directory", directory)
    hosts = tuple(h.lower().rstrip(".") for h in reader.strings("hosts"))
    if not hosts:
        raise reader.error("hosts", "at least one host name is required")
    for host in hosts:
        if host.startswith("*."):
            raise reader.error("hosts", f"{host}: HTTP-01 cannot validate wildcard names")
        if not _ACME_HOST.match(host):
            raise reader.error("hosts", f"{host!r} is not a DNS host name")
    email = reader.get("email", str, "")
    if email and ("@" not in email or any(c in email for c in " \t\r\n,;<>")):
        raise reader.error("email", f"{email!r} is not an e-mail address")
    ca_file = reader.resolve(reader.get("ca_file", str, ""))
    if ca_file and not os.access(ca_file, os.R_OK):
        raise reader.error("ca_file", f"cannot read {ca_file}")
    renew_before = reader.convert("renew_before", 30 * 86400, parse_duration)
    check_interval = reader.convert("check_interval", 12 * 3600, parse_duration)
    if renew_before <= 0:
        raise reader.error("renew_before", "must be positive")
    if check_interval < 60:
        raise reader.error("check_interval", "must be at least 60 seconds")
    reader.check_unknown()
    return AcmeConfig(
        directory=directory,
        hosts=tuple(dict.fromkeys(hosts)),
        email=email,
        ca_file=ca_file,
        renew_before=renew_before,
        check_interval=check_interval,
    )


def _read_tls(reader: _Reader) -> tuple[list[TlsCertificate], str, AcmeConfig | None]:
    """C{[tls]}: the certificate files (read and checked now), min_version and ACME."""
    certificates = []
    for index, entry in enumerate(reader.get("certificate", list, [])):
        if not isinstance(entry, dict):
            raise reader.error(f"certificate[{index}]", "must be a table")
        where = reader.key(f"certificate[{index}]")
        entry_reader = _Reader(reader.path, reader.base_dir, entry, where)
        certificates.append(_read_certificate_entry(entry_reader))
    min_version = reader.get("min_version", str, "1.2")
    if min_version not in ("1.2", "1.3"):
        raise reader.error("min_version", 'must be "1.2" or "1.3"')
    acme = _read_acme(reader.table_of("acme")) if reader.has("acme") else None
    reader.seen.add("acme")
    return certificates, min_version, acme


def parse_config(text: str, path: str) -> Config:
    """Parse and validate config text; C{path} names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(syntax)", str(e)) from None
    base_dir = os.path.dirname(os.path.abspath(path))
    root = _Reader(path, base_dir, data, "")

    server_reader = root.table_of("server")
    server = _read_server(server_reader)
    server_reader.check_unknown()

    gate_reader = root.table_of("gate")
    gate = _read_gate(gate_reader)
    gate_reader.check_unknown()

    upstream: UpstreamConfig | None = None
    if root.has("upstream"):
        upstream_reader = root.table_of("upstream")
        upstream = _read_upstream(upstream_reader, "url")
        upstream_reader.check_unknown()
    else:
        root.seen.add("upstream")

    identity_reader = root.table_of("identity")
    identity = _header_pairs(identity_reader, "headers")
    identity_reader.check_unknown()

    llm_reader = root.table_of("llm")
    llm = LlmConfig(
        enabled=llm_reader.get("enabled", bool, False),
        path="/" + llm_reader.get("path", str, "/api/llm").strip("/"),
        upstream=llm_reader.get("upstream", str, "http://127.0.0.1:8008"),
        master_key=llm_reader.secret("master_key", required=False),
        allowed_origins=tuple(o.rstrip("/") for o in llm_reader.strings("allowed_origins")),
    )
    if llm.enabled:
        _check_url(llm_reader, "upstream", llm.upstream)
        if not llm.master_key:
            raise llm_reader.error("master_key", "is required when llm.enabled = true")
        _check_llm(llm_reader, llm, gate)
    llm_reader.check_unknown()

    websocket = _read_websocket(root.table_of("websocket"))

    theme_reader = root.table_of("theme")
    css_file = theme_reader.resolve(theme_reader.get("css_file", str, ""))
    theme = ThemeConfig(css_file=_check_css(theme_reader, css_file))
    theme_reader.check_unknown()

    metrics_reader = root.table_of("metrics")
    metrics = MetricsConfig(
        enabled=metrics_reader.get("enabled", bool, True),
        allow=_networks(metrics_reader, "allow", LOOPBACK_NETWORKS),
    )
    metrics_reader.check_unknown()

    log_reader = root.table_of("log")
    log_format = log_reader.get("format", str, "text")
    if log_format not in ("text", "json"):
        raise log_reader.error("format", 'must be "text" or "json"')
    log_config = LogConfig(
        format=log_format, access_log=log_reader.get("access_log", bool, False)
    )
    log_reader.check_unknown()

    tls_reader = root.table_of("tls")
    certificates, tls_min_version, acme = _read_tls(tls_reader)
    tls_reader.check_unknown()

    sites: list[SiteConfig] = []
    for index, entry in enumerate(root.get("site", list, [])):
        if not isinstance(entry, dict):
            raise root.error(f"site[{index}]", "must be a table")
        site_reader = _Reader(path, base_dir, entry, f"site[{index}]")
        host = site_reader.get("host", str, "").lower().strip().rstrip(".")
        if not _SITE_HOST.match(host) or ".." in host:
            raise site_reader.error("host", "is required: a host name or *.domain")
        if any(site.host == host for site in sites):
            raise site_reader.error("host", f"{host} is already served by an earlier [[site]]")
        site_upstream = _read_upstream(site_reader, "upstream")
        identity_table = site_reader.table_of("identity")
        site_identity = _header_pairs(identity_table, "headers") if identity_table.table else ()
        identity_table.check_unknown()
        public = site_reader.strings("public_paths")
        for public_path in public:
            if not public_path.startswith("/"):
                raise site_reader.error("public_paths", f"{public_path!r} must start with /")
        sites.append(
            SiteConfig(
                host=host,
                upstream=site_upstream,
                identity_headers=site_identity or identity,
                css_file=_check_css(
                    site_reader, site_reader.resolve(site_reader.get("css_file", str, ""))
                ),
                public_paths=public,
            )
        )
        site_reader.check_unknown()

    root.check_unknown()
    if upstream is None and not sites:
        raise ConfigError(path, "upstream.url", "is required (or configure at least one [[site]])")
    if server.listen_tls and not certificates and acme is None:
        raise ConfigError(
            path, "tls.certificate", "is required when server.listen_tls is set (or [tls.acme])"
        )
    if acme is not None and not server.listen_tls:
        raise ConfigError(path, "tls.acme", "needs server.listen_tls to serve the certificates")
    if acme is not None and not server.redirect_http:
        raise ConfigError(
            path, "tls.acme", "needs server.redirect_http (port 80) to answer HTTP-01 challenges"
        )

    return Config(
        path=path,
        server=server,
        gate=gate,
        upstream=upstream,
        identity_headers=identity,
        llm=llm,
        theme=theme,
        websocket=websocket,
        metrics=metrics,
        log=log_config,
        tls_certificates=tuple(certificates),
        tls_min_version=tls_min_version,
        acme=acme,
        sites=tuple(sites),
    )


def load_config(path: str) -> Config:
    """Read and validate the file at C{path}; raises L{ConfigError}."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "(file)", "is not UTF-8 text") from None
    return parse_config(text, path)
