# -*- test-case-name: tests.test_tap -*-
"""
The twistd entry point: options, and the service that runs the gate.

This is the only module that reads the config file at start, builds the
object graph and touches the global reactor.  A bad configuration stops the
process with one line on stderr (exit 1) before anything listens.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from pingated.agents import AgentFactory, make_pool
from pingated.app import Runtime, build_root
from pingated.config import Config, ConfigError, load_config
from pingated.logging import AccessLog, install_observer
from pingated.metrics import GateMetrics
from pingated.pins import low_priority
from pingated.server import GateSite
from pingated.sessions import RevocationStore
from pingated.streaming import StreamingRequest, outside_prefix
from pingated.threads import thread_runner
from pingated.throttle import Throttle
from pingated.tls import GateTls, TlsMaterial

log = Logger(namespace="pingated")

# Threads verifying PINs (argon2 uses several cores per check on its own).
PIN_THREADS = 2


class Options(usage.Options):
    """C{twistd pingated --config FILE}."""

    optParameters = [
        ["config", "c", "etc/pingated.toml", "Path to the TOML configuration file."],
    ]


class ReloadableRoot(Resource):
    """The site's root; SIGHUP swaps what it delegates to without touching connections."""

    isLeaf = True

    def __init__(self, current: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.current = current

    def render(self, request: IRequest) -> Any:
        """Hand the request to the current configuration's tree."""
        return self.current.render(request)


class StartRefused(Exception):
    """The gate cannot start as configured (e.g. a listener's port is taken)."""


class GateService(MultiService):
    """Runs the listeners, the thread pool and SIGHUP reloads for one gate."""

    def __init__(self, config: Config, reactor: Any, twistd_options: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        # twistd's own options (-n, --logfile): where JSON log lines go.
        self.twistd_options = twistd_options
        self.metrics = GateMetrics()
        self.access_log = (
            AccessLog(config.server.trusted_proxies) if config.log.access_log else None
        )
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="pingated")
        # argon2 gets threads of its own, so a login flood never delays the
        # small state-file writes; PinVerifier refuses (503) beyond
        # its max_pending instead of queueing without bound.
        self.pin_pool = ThreadPool(minthreads=0, maxthreads=PIN_THREADS, name="pingated-pin")
        run_in_thread = thread_runner(reactor, self.pool)
        now = reactor.seconds()
        try:
            revocations = RevocationStore.load(config.server.state_dir, run_in_thread, now)
            throttle = Throttle.load(
                config.server.state_dir, config.gate.throttle, reactor, run_in_thread
            )
        except OSError as e:
            raise ConfigError(
                config.path,
                "server.state_dir",
                f"cannot use {config.server.state_dir}: {e.strerror}",
            ) from None
        self.http_pool = make_pool(reactor)
        self.runtime = Runtime(
            reactor=reactor,
            clock=reactor,
            run_in_thread=run_in_thread,
            agent_for=AgentFactory(reactor, self.http_pool),
            revocations=revocations,
            throttle=throttle,
            started=now,
            verify_in_thread=low_priority(thread_runner(reactor, self.pin_pool)),
            metrics=self.metrics,
        )
        self.root = ReloadableRoot(build_root(config, self.runtime))
        self.site = GateSite(
            self.root,
            reactor=reactor,
            request_factory=StreamingRequest,
            stream_body=lambda target: outside_prefix(self.config.gate.prefix, target),
            header_timeout=config.server.header_timeout,
            request_done=self._request_done,
        )
        # TLS: ssl: strings in listen, listen_tls with SNI, the redirect listener, ACME.
        self.tls = GateTls(config, reactor, run_in_thread)
        # (service, config key, endpoint string) of every listener, so one that
        # cannot listen at start is named in the one-line refusal.
        self.listeners: list[tuple[StreamServerEndpointService, str, str]] = []
        for description in config.server.listen:
            endpoint = self.tls.listen_endpoint(description)
            self._listener(StreamServerEndpointService(endpoint, self.site), "listen", description)
        for description in config.server.listen_tls:
            endpoint = self.tls.sni_endpoint(description)
            self._listener(
                StreamServerEndpointService(endpoint, self.site), "listen_tls", description
            )
        self.redirect_site = GateSite(self.tls.redirect_resource(), reactor=reactor)
        for description in config.server.redirect_http:
            endpoint = serverFromString(reactor, description)
            self._listener(
                StreamServerEndpointService(endpoint, self.redirect_site),
                "redirect_http",
                description,
            )

    def _listener(self, service: StreamServerEndpointService, key: str, description: str) -> None:
        # Listen errors raise at start instead of being logged while the
        # process runs on without that listener (a half-working gate).
        service._raiseSynchronously = True
        service.setServiceParent(self)
        self.listeners.append((service, key, description))

    def privilegedStartService(self) -> None:
        """
        Listen (as root, before twistd drops privileges).  An endpoint that
        cannot listen (port in use, no permission) stops the start with one
        line naming the file and key, and exit 1 -- never a process that runs
        without one of its listeners.
        """
        keys = {id(service): (key, description) for service, key, description in self.listeners}
        for service in list(self):
            try:
                service.privilegedStartService()
            except Exception as e:
                key, description = keys.get(id(service), ("listen", "?"))
                reason = getattr(getattr(e, "socketError", None), "strerror", None) or str(e)
                self.refuse_start(
                    f"{self.config.path}: server.{key}: cannot listen on {description!r} ({reason})"
                )

    def refuse_start(self, message: str) -> None:
        """
        Stop the start with C{message}: in the foreground one line on the real
        stderr and exit 1; daemonised, an error twistd hands to the waiting
        parent, which prints it and exits 1.
        """
        options = self.twistd_options
        if options is not None and options.get("nodaemon"):
            stderr = sys.__stderr__ or sys.stderr
            stderr.write(message + "\n")
            stderr.flush()
            raise SystemExit(1) from None
        raise StartRefused(message) from None

    def setServiceParent(self, parent: Any) -> Any:
        """Joining twistd's Application: offer it our log observer ([log] format)."""
        result = super().setServiceParent(parent)  # type: ignore[no-untyped-call]
        install_observer(parent, self.config.log, self.twistd_options)
        return result

    def _request_done(self, request: IRequest) -> None:
        """Every answered request: counted, and logged when [log] access_log is on."""
        site = self.metrics.request_done(request)
        if self.access_log is not None:
            self.access_log(request, site)

    def startService(self) -> None:
        """Start the thread pool and listeners; install the SIGHUP handler."""
        self.pool.start()
        self.pin_pool.start()
        super().startService()  # type: ignore[no-untyped-call]
        self.tls.start()
        signal.signal(signal.SIGHUP, self._on_sighup)
        log.info(
            "pingated ready: listening on {listen}, upstream {upstream}",
            listen=", ".join(
                self.config.server.listen
                + tuple(f"{d} (TLS)" for d in self.config.server.listen_tls)
                + tuple(f"{d} (redirect)" for d in self.config.server.redirect_http)
            ),
            upstream=self.config.upstream.url if self.config.upstream else "(sites only)",
        )

    def stopService(self) -> Deferred[None]:
        """Stop listening, close upstream connections, stop the threads."""
        d: Deferred[Any] = Deferred()
        d.callback(None)
        self.tls.stop()
        stopped = super().stopService()  # type: ignore[no-untyped-call]
        if stopped is not None:
            d = stopped
        d.addCallback(lambda _: self.http_pool.closeCachedConnections())
        d.addBoth(self._throttle_saved)
        d.addBoth(self._stop_pool)
        return d

    def _throttle_saved(self, result: object) -> Deferred[object]:
        # The last failed logins reach the disk before the threads stop, so
        # a restart does not hand out a fresh budget.
        saved: Deferred[object] = Deferred()
        store = self.runtime.throttle.store
        if store is None:
            saved.callback(result)
        else:
            store.when_idle(lambda: saved.callback(result))
        return saved

    def _stop_pool(self, result: object) -> object:
        self.pin_pool.stop()
        self.pool.stop()
        return result

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None]:
        """Re-read the configuration; a bad one is logged and the old one kept."""
        path = self.config.path
        loading: Deferred[tuple[Config, tuple[TlsMaterial, list[str]]]]
        loading = self.runtime.run_in_thread(self._load, path)

        def apply(loaded: tuple[Config, tuple[TlsMaterial, list[str]]]) -> None:
            config, (material, notes) = loaded
            # Certificates swap in place: open connections keep theirs.
            self.tls.apply(config, material, notes)
            if config.server.listen != self.config.server.listen:
                log.warn("server.listen changed: restart pingated to apply new listeners")
            self.root.current = build_root(config, self.runtime)
            self.site.header_timeout = config.server.header_timeout
            self.access_log = (
                AccessLog(config.server.trusted_proxies) if config.log.access_log else None
            )
            self.config = config
            log.info("configuration reloaded from {path}", path=path)

        def refuse(failure: Failure) -> None:
            if failure.check(ConfigError):
                log.error(
                    "reload refused, keeping the old configuration: {why}", why=str(failure.value)
                )
            else:
                log.failure("reload failed, keeping the old configuration", failure)

        return loading.addCallback(apply).addErrback(refuse)

    def _load(self, path: str) -> tuple[Config, tuple[TlsMaterial, list[str]]]:
        """The new configuration and its certificates, read off the reactor thread."""
        config = load_config(path)
        return config, self.tls.load(config)


def makeService(options: Options) -> IService:
    """Build the gate from C{--config}; exit with one clear line if it is bad."""
    from twisted.internet import reactor

    try:
        config = load_config(options["config"])
        return GateService(config, reactor, getattr(options, "parent", None))
    except ConfigError as e:
        raise SystemExit(str(e)) from None
