# -*- test-case-name: tests.test_tap -*-
"""
The twistd entry point: options, and the service that runs the gate.

This is the only module that reads the config file at start, builds the
object graph and touches the global reactor.  A bad configuration stops the
process with one line on stderr (exit 1) before anything listens.
"""

from __future__ import annotations

import signal
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
from pingated.server import GateSite
from pingated.sessions import RevocationStore
from pingated.threads import thread_runner
from pingated.throttle import Throttle

log = Logger(namespace="pingated")


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


class GateService(MultiService):
    """Runs the listeners, the thread pool and SIGHUP reloads for one gate."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="pingated")
        run_in_thread = thread_runner(reactor, self.pool)
        now = reactor.seconds()
        try:
            revocations = RevocationStore.load(config.server.state_dir, run_in_thread, now)
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
            throttle=Throttle(config.gate.throttle, reactor),
            started=now,
        )
        self.root = ReloadableRoot(build_root(config, self.runtime))
        self.site = GateSite(self.root, reactor=reactor)
        for description in config.server.listen:
            endpoint = serverFromString(reactor, description)
            StreamServerEndpointService(endpoint, self.site).setServiceParent(self)

    def startService(self) -> None:
        """Start the thread pool and listeners; install the SIGHUP handler."""
        self.pool.start()
        super().startService()  # type: ignore[no-untyped-call]
        signal.signal(signal.SIGHUP, self._on_sighup)
        log.info(
            "pingated ready: listening on {listen}, upstream {upstream}",
            listen=", ".join(self.config.server.listen),
            upstream=self.config.upstream.url if self.config.upstream else "(sites only)",
        )

    def stopService(self) -> Deferred[None]:
        """Stop listening, close upstream connections, stop the threads."""
        d: Deferred[Any] = Deferred()
        d.callback(None)
        stopped = super().stopService()  # type: ignore[no-untyped-call]
        if stopped is not None:
            d = stopped
        d.addCallback(lambda _: self.http_pool.closeCachedConnections())
        d.addBoth(self._stop_pool)
        return d

    def _stop_pool(self, result: object) -> object:
        self.pool.stop()
        return result

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None]:
        """Re-read the configuration; a bad one is logged and the old one kept."""
        path = self.config.path
        loading: Deferred[Config] = self.runtime.run_in_thread(load_config, path)

        def apply(config: Config) -> None:
            if config.server.listen != self.config.server.listen:
                log.warn("server.listen changed: restart pingated to apply new listeners")
            self.root.current = build_root(config, self.runtime)
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


def makeService(options: Options) -> IService:
    """Build the gate from C{--config}; exit with one clear line if it is bad."""
    from twisted.internet import reactor

    try:
        config = load_config(options["config"])
        return GateService(config, reactor)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
