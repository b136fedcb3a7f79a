# -*- test-case-name: tests.test_config -*-
"""
The TOML configuration, parsed once into frozen attrs records.

Everything the daemon does is decided by these records; nothing else reads
the file.  Every problem is reported as one line naming the file, the key and
what is wrong, because that line is what an operator sees when the service
refuses to start.
"""

from __future__ import annotations

import ipaddress
import os
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
        super().__init__(f"{path}: {key}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


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
class TlsCertificate:
    """One certificate chain and key for the SNI set of C{listen_tls}."""

    cert_file: str
    key_file: str


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
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    tls_certificates: tuple[TlsCertificate, ...] = ()
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
        try:
            serverFromString(_NoReactor(), description)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise reader.error(
                name, f"{description!r} is not a valid endpoint string ({reason})"
            ) from None


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


def _read_gate(reader: _Reader) -> GateConfig:
    pin_hash = reader.secret("pin_hash", required=True)
    try:
        from argon2 import extract_parameters

        extract_parameters(pin_hash)
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
    if not prefix.startswith("/") or "?" in prefix or "#" in prefix or len(prefix) < 2:
        raise reader.error("prefix", "must be a path like /.pingated")
    cookie_name = reader.get("cookie_name", str, "pingated")
    if not cookie_name or any(c in cookie_name for c in " =;,\t\r\n\"'"):
        raise reader.error("cookie_name", "is not a valid cookie name")
    cookie_domain = reader.get("cookie_domain", str, "").lower()
    if cookie_domain and (" " in cookie_domain or ";" in cookie_domain):
        raise reader.error("cookie_domain", "is not a valid domain")
    login_url = reader.get("login_url", str, "")
    if login_url:
        _check_url(reader, "login_url", login_url)
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
        logo_file=reader.resolve(reader.get("logo_file", str, "")),
        throttle=throttle,
    )


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
    llm_reader.check_unknown()

    theme_reader = root.table_of("theme")
    theme = ThemeConfig(css_file=theme_reader.resolve(theme_reader.get("css_file", str, "")))
    theme_reader.check_unknown()

    metrics_reader = root.table_of("metrics")
    metrics = MetricsConfig(
        enabled=metrics_reader.get("enabled", bool, True),
        allow=_networks(metrics_reader, "allow", LOOPBACK_NETWORKS),
    )
    metrics_reader.check_unknown()

    tls_reader = root.table_of("tls")
    certificates = []
    for index, entry in enumerate(tls_reader.get("certificate", list, [])):
        if not isinstance(entry, dict):
            raise tls_reader.error(f"certificate[{index}]", "must be a table")
        cert_reader = _Reader(path, base_dir, entry, f"tls.certificate[{index}]")
        cert = TlsCertificate(
            cert_file=cert_reader.resolve(cert_reader.get("cert_file", str, "")),
            key_file=cert_reader.resolve(cert_reader.get("key_file", str, "")),
        )
        if not cert.cert_file or not cert.key_file:
            raise cert_reader.error("cert_file", "cert_file and key_file are both required")
        cert_reader.check_unknown()
        certificates.append(cert)
    tls_reader.check_unknown()

    sites = []
    for index, entry in enumerate(root.get("site", list, [])):
        if not isinstance(entry, dict):
            raise root.error(f"site[{index}]", "must be a table")
        site_reader = _Reader(path, base_dir, entry, f"site[{index}]")
        host = site_reader.get("host", str, "").lower().strip()
        if not host or "/" in host or " " in host:
            raise site_reader.error("host", "is required: a host name or *.domain")
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
                css_file=site_reader.resolve(site_reader.get("css_file", str, "")),
                public_paths=public,
            )
        )
        site_reader.check_unknown()

    root.check_unknown()
    if upstream is None and not sites:
        raise ConfigError(path, "upstream.url", "is required (or configure at least one [[site]])")
    if server.listen_tls and not certificates:
        raise ConfigError(path, "tls.certificate", "is required when server.listen_tls is set")

    return Config(
        path=path,
        server=server,
        gate=gate,
        upstream=upstream,
        identity_headers=identity,
        llm=llm,
        theme=theme,
        metrics=metrics,
        tls_certificates=tuple(certificates),
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
