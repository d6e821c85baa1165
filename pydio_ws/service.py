"""The twistd service: Options from the key table, and Config -> objects -> listeners."""

import signal
from datetime import datetime, timezone

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.web.client import Agent
from twisted.web.resource import Resource

from pydio_ws.auth import TokenAuthenticator
from pydio_ws.broker import Broker
from pydio_ws.collector import tune_collector
from pydio_ws.config import KEYS, ConfigError, load_config
from pydio_ws.gate import PublisherGate
from pydio_ws.keys import resolve_private_key
from pydio_ws.limits import ConnectionCounter, FailureLimiter
from pydio_ws.logs import DEFAULT_LEVEL, FORMATS, LEVELS, observer_name
from pydio_ws.listener import ListenerFactory, ListenerService, Routes, server_endpoint
from pydio_ws.origins import OriginPolicy, normalize_origin
from pydio_ws.private import PublisherFactory, Publisher, PublishResource, StatusResource
from pydio_ws.public import BrowserFactory, frame_message
from pydio_ws.redis_backend import make_backend
from pydio_ws.sniff import TLSOrPlainFactory
from pydio_ws.pydio_auth import PydioAuthenticator
from pydio_ws.stats import Stats
from pydio_ws.tls import (ReloadableServerContextFactory, ServerTLSFiles, TLSError,
                          client_tls_policy, describe_certificate, load_server_credentials)
from pydio_ws.web import BoundedSite, UpgradeRequired, mount
from pydio_ws.workers import ReusePortEndpoint, WorkerPool


class Options(usage.Options):
    """Command line of `twistd pydio-ws`: --config plus one option per config key."""

    synopsis = "[--config FILE] [--public-host H] [--public-port P] ..."
    optParameters = [
        ["config", "c", None, "INI configuration file."],
        ["log-format", None, "text", "Log output: text or json (one JSON object per line)."],
        ["log-level", None, DEFAULT_LEVEL, f"Lowest level logged: {', '.join(LEVELS)}."],
    ] + [
        [key.option, None, None, f"{key.help} [env {key.env_var}, default {key.default!r}]"]
        for key in KEYS if not key.secret
    ]

    def postOptions(self):
        self._choose_log_observer()
        overrides = {
            (key.section, key.name): self[key.option]
            for key in KEYS if not key.secret and self[key.option] is not None
        }
        try:
            self.config = load_config(self["config"], overrides=overrides)
            preflight(self.config, datetime.now(timezone.utc))
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None

    def _choose_log_observer(self) -> None:
        """Point twistd's --logger at our observer for --log-format and --log-level.

        Only where twistd would write to standard output itself (-n, no --logfile or
        --syslog), or for JSON, which always goes there; otherwise twistd's own observer
        stays, unfiltered.
        """
        log_format, level = self["log-format"], self["log-level"]
        if log_format not in FORMATS:
            raise usage.UsageError(f"--log-format: expected text or json, got {log_format!r}")
        if level not in LEVELS:
            raise usage.UsageError(f"--log-level: expected one of {', '.join(LEVELS)}, got {level!r}")
        twistd = self.parent
        if twistd is None or twistd.get("logger"):
            return
        to_stdout = twistd.get("nodaemon") and not twistd.get("logfile") and not twistd.get("syslog")
        if log_format == "json" or to_stdout:
            twistd["logger"] = observer_name(log_format, level)
        elif level != DEFAULT_LEVEL:
            raise usage.UsageError("--log-level applies to standard output: run twistd with -n, "
                                   "without --logfile or --syslog")


def listener_names(config) -> tuple:
    """The listeners a configuration asks for."""
    return ("listener-shared",) if config.shared_listener else ("listener-public", "listener-private")


def listener_tls(config, name: str):
    """The TLS files of a listener, or None for plain TCP (a shared one follows [public])."""
    label = "private" if name == "listener-private" else "public"
    side = getattr(config, label)
    if not side.ssl:
        return None
    return ServerTLSFiles(side.ssl_cert, side.ssl_key, side.ssl_chain, side.ssl_client_ca, label)


def preflight(config, now: datetime) -> list:
    """Check the TLS files and CA bundle a config names; one line per certificate.

    Raises ConfigError with the precise reason, so startup and check-config stop early.
    """
    lines = []
    try:
        for name in listener_names(config):
            files = listener_tls(config, name)
            if files is not None:
                credentials = load_server_credentials(files, now)
                lines.append(f"{files.label} certificate: {describe_certificate(credentials, now)}")
        if config.auth.mode == "pydio":
            client_tls_policy(config.auth.verify_ssl, config.auth.ca_file)
    except TLSError as error:
        raise ConfigError(str(error)) from None
    return lines


class PydioWSService(service.MultiService):
    """pydio-ws: browser and publisher listeners around one broker."""

    _log = Logger()

    def __init__(self, config, reactor, owns_process: bool = False, worker_index: int = 0,
                 log_output: tuple = ("text", DEFAULT_LEVEL)):
        """`owns_process`: this service is the whole process (twistd or a worker): it
        reloads on SIGHUP and tunes the cycle collector once running. `log_output`:
        the (format, level) of the log, for the worker processes."""
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._worker_index = worker_index
        self._owns_process = owns_process
        self._tls = {}
        self.stats = Stats(reactor.seconds())
        self.private_key = resolve_private_key(config)
        self.broker = Broker(frame_message, backend=make_backend(config, reactor), stats=self.stats)
        limits = config.limits
        self._key_failures = FailureLimiter(reactor, limits.max_auth_failures, limits.auth_failure_window)
        gate = PublisherGate(lambda: self.config.private.authorized_hosts, self._current_key,
                             self._key_failures, lambda: self.config.limits.trusted_proxies)
        publisher = Publisher(self.broker, self.stats)
        self.browser_factory = BrowserFactory(
            reactor, self.broker, self._authenticator(), self._origin_policy(), self.stats,
            ConnectionCounter(limits.max_connections, limits.max_connections_per_ip),
            FailureLimiter(reactor, limits.max_auth_failures, limits.auth_failure_window))
        self.browser_factory.apply_limits(limits)
        self._publisher_factory = PublisherFactory(reactor, gate, publisher)
        self._publisher_factory.apply_limits(limits, config.private.max_body_size)
        publisher_factory = self._publisher_factory
        private_resource = PublishResource(gate, publisher)
        private_resource.putChild(b"status", StatusResource(reactor, gate, self.broker, self.stats))
        public, private = config.public, config.private
        if config.shared_listener:
            root = Resource()
            mount(root, public.path, UpgradeRequired())
            mount(root, private.path, private_resource)
            site = BoundedSite(root, private.max_body_size, reactor)
            routes = Routes(site, public.path, self.browser_factory, private.path, publisher_factory)
            # Pydio 6 publishes in plain text even when its browsers use wss://.
            plain_routes = None if private.ssl else Routes(
                site, publisher_path=private.path, publishers=publisher_factory)
            self._add_listener("listener-shared", public.host, public.port, routes, plain_routes)
        else:
            public_root, private_root = Resource(), Resource()
            mount(public_root, public.path, UpgradeRequired())
            mount(private_root, private.path, private_resource)
            self._add_listener("listener-public", public.host, public.port, Routes(
                BoundedSite(public_root, private.max_body_size, reactor), public.path, self.browser_factory))
            self._add_listener("listener-private", private.host, private.port, Routes(
                BoundedSite(private_root, private.max_body_size, reactor),
                publisher_path=private.path, publishers=publisher_factory))
        if config.server.workers > 1 and worker_index == 0:
            pool = WorkerPool(reactor, config, self._bound_ports, log_output)
            pool.setName("workers")
            pool.setServiceParent(self)

    def _bound_ports(self) -> dict:
        """The ports the listeners really got, for the other workers to share."""
        names = listener_names(self.config)
        return {"public": self.listening_port(names[0]), "private": self.listening_port(names[-1])}

    def _current_key(self) -> str:
        """The private key now (collaborators call this at each use, so a reload applies)."""
        return self.private_key.value

    def _authenticator(self):
        auth = self.config.auth
        if auth.mode == "token":
            return TokenAuthenticator(self._current_key)
        if not auth.verify_ssl:
            self._log.warn("auth.verify_ssl = false: the Pydio host's certificate is not verified")
        agent = Agent(self._reactor, contextFactory=client_tls_policy(auth.verify_ssl, auth.ca_file))
        return PydioAuthenticator(
            self._reactor, auth.pydio_url, self._current_key, timeout=auth.timeout,
            cache_ttl=auth.cache_ttl, max_concurrent=auth.max_concurrent, max_queued=auth.max_queued,
            agent=agent)

    def _origin_policy(self) -> OriginPolicy:
        """Configured origins; in pydio mode an empty list means pydio_url's origin only."""
        allowed = self.config.public.allowed_origins
        if not allowed and self.config.auth.mode == "pydio":
            allowed = (normalize_origin(self.config.auth.pydio_url),)
        return OriginPolicy(allowed)

    def _add_listener(self, name, host, port, routes, plain_routes=None):
        """Listen for `routes`; on a TLS listener, `plain_routes` serve non-TLS connections."""
        timeout = self.config.limits.handshake_timeout
        routers = [ListenerFactory(routes, self._reactor, timeout)]
        factory = routers[0]
        files = listener_tls(self.config, name)
        if files is not None:
            try:
                self._tls[name] = ReloadableServerContextFactory(files, self._now())
            except TLSError as error:
                raise ConfigError(str(error)) from None
            self._warn_if_expiring(files.label, self._tls[name].credentials)
            factory = TLSMemoryBIOFactory(self._tls[name], False, factory)
            if plain_routes is not None:
                routers.append(ListenerFactory(plain_routes, self._reactor, timeout))
                factory = TLSOrPlainFactory(self._reactor, factory, routers[1], timeout)
        if self.config.server.workers > 1:
            endpoint = ReusePortEndpoint(self._reactor, host, port)
        else:
            endpoint = server_endpoint(self._reactor, host, port)
        listener = ListenerService(endpoint, factory, routers)
        listener.setName(name)
        listener.setServiceParent(self)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._reactor.seconds(), timezone.utc)

    def _warn_if_expiring(self, label: str, credentials) -> None:
        if credentials.expires_soon(self._now()):
            self._log.warn("{label} certificate expires soon: {summary}", label=label,
                           summary=describe_certificate(credentials, self._now()))

    def reload(self) -> None:
        """SIGHUP: re-read the configuration and the TLS files, applying what can change
        in place; open connections stay. An invalid configuration is rejected whole."""
        if self.config.source:
            self._reload_config()
        self._reload_tls()
        if self.config.server.workers > 1 and self._worker_index == 0:
            self.getServiceNamed("workers").signal_all(signal.SIGHUP)

    def _reload_config(self) -> None:
        try:
            new = self.config.reloaded()
            preflight(new, self._now())
            private_key = resolve_private_key(new)
        except ConfigError as error:
            self._log.error("configuration reload rejected, keeping the current one: {reason}",
                            reason=str(error))
            return
        restart = [key.label for key in KEYS
                   if not key.reloadable and new.value(key) != self.config.value(key)]
        if restart:
            self._log.warn("changed keys take effect only after a restart: {keys}",
                           keys=", ".join(restart))
        self.config = new.with_restart_values_of(self.config)
        self.private_key = private_key
        self._apply_reloadable()
        self._log.info("configuration reloaded from {source}; private key from {key_source}",
                       source=self.config.source, key_source=private_key.source)

    def _apply_reloadable(self) -> None:
        """Push the reloadable settings of self.config into the running objects."""
        limits = self.config.limits
        self.browser_factory.origins = self._origin_policy()
        self.browser_factory.authenticator = self._authenticator()
        self.browser_factory.apply_limits(limits)
        self._publisher_factory.apply_limits(limits, self.config.private.max_body_size)
        self._key_failures.configure(limits.max_auth_failures, limits.auth_failure_window)
        for name in listener_names(self.config):
            self.getServiceNamed(name).apply_limits(limits, self.config.private.max_body_size)

    def _reload_tls(self) -> None:
        for name, context_factory in self._tls.items():
            try:
                credentials = context_factory.reload(self._now())
            except TLSError as error:
                self._log.error("TLS reload of {listener} failed, keeping the old certificate: {reason}",
                                listener=name, reason=str(error))
                continue
            self._log.info("TLS reloaded for {listener}: {summary}", listener=name,
                           summary=describe_certificate(credentials, self._now()))
            self._warn_if_expiring(name, credentials)

    def listening_port(self, name: str) -> int:
        """The port a named listener really listens on (for port 0 in tests)."""
        return self.getServiceNamed(name).port.getHost().port

    def startService(self):
        self._log.info("private key from {source}", source=self.private_key.source)
        if self._owns_process:
            signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload))
            self._reactor.callWhenRunning(tune_collector)
        self.broker.start().addErrback(
            lambda failure: self._log.failure("broker failed to start", failure))
        super().startService()

    def stopService(self):
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        await defer.gatherResults([
            defer.maybeDeferred(listener.stopService)
            for listener in list(self) if listener.running
        ])
        service.Service.stopService(self)
        await self.browser_factory.close_all(self.config.limits.shutdown_timeout)
        await self.broker.stop()


def makeService(options) -> PydioWSService:
    """twistd entry point."""
    from twisted.internet import reactor
    return PydioWSService(options.config, reactor, owns_process=True,
                          log_output=(options["log-format"], options["log-level"]))
