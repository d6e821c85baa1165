"""The twistd service: Options from the key table, and Config -> objects -> listeners."""

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource

from pydio_ws.auth import TokenAuthenticator
from pydio_ws.broker import Broker
from pydio_ws.config import KEYS, ConfigError, load_config
from pydio_ws.gate import PublisherGate
from pydio_ws.keys import resolve_private_key
from pydio_ws.listener import ListenerFactory, Routes
from pydio_ws.origins import OriginPolicy, normalize_origin
from pydio_ws.private import PublisherFactory, Publisher, PublishResource, StatusResource
from pydio_ws.public import BrowserFactory, frame_message
from pydio_ws.stats import Stats
from pydio_ws.web import BoundedSite, UpgradeRequired, mount

BROWSER_MESSAGE_LIMIT = 64 * 1024


class Options(usage.Options):
    """Command line of `twistd pydio-ws`: --config plus one option per config key."""

    synopsis = "[--config FILE] [--public-host H] [--public-port P] ..."
    optParameters = [["config", "c", None, "INI configuration file."]] + [
        [key.option, None, None, f"{key.help} [env {key.env_var}, default {key.default!r}]"]
        for key in KEYS if not key.secret
    ]

    def postOptions(self):
        overrides = {
            (key.section, key.name): self[key.option]
            for key in KEYS if not key.secret and self[key.option] is not None
        }
        try:
            self.config = load_config(self["config"], overrides=overrides)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None


class ListenerService(service.Service):
    """Listens on one endpoint; a bind failure raises, so startup stops."""

    def __init__(self, endpoint, factory):
        self._endpoint = endpoint
        self._factory = factory
        self.port = None

    def privilegedStartService(self):
        listening = self._endpoint.listen(self._factory)
        failures = []
        listening.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()
        super().privilegedStartService()

    def _listening(self, port):
        self.port = port

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)


def server_endpoint(reactor, host: str, port: int):
    """The server endpoint for a listen address."""
    description = f"tcp:port={port}:interface={endpoints.quoteStringArgument(host)}"
    return endpoints.serverFromString(reactor, description)


class PydioWSService(service.MultiService):
    """pydio-ws: browser and publisher listeners around one broker."""

    _log = Logger()

    def __init__(self, config, reactor):
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.stats = Stats(reactor.seconds())
        self.private_key = resolve_private_key(config)
        self.broker = Broker(frame_message, stats=self.stats)
        gate = PublisherGate(lambda: config.private.authorized_hosts, lambda: self.private_key.value)
        publisher = Publisher(self.broker, self.stats)
        self.browser_factory = BrowserFactory(
            reactor, self.broker, self._authenticator(), self._origin_policy(), self.stats)
        self.browser_factory.setProtocolOptions(maxMessagePayloadSize=BROWSER_MESSAGE_LIMIT,
                                                maxFramePayloadSize=BROWSER_MESSAGE_LIMIT)
        publisher_factory = PublisherFactory(reactor, gate, publisher, config.private.max_body_size)
        private_resource = PublishResource(gate, publisher)
        private_resource.putChild(b"status", StatusResource(reactor, gate, self.broker, self.stats))
        public, private = config.public, config.private
        if config.shared_listener:
            root = Resource()
            mount(root, public.path, UpgradeRequired())
            mount(root, private.path, private_resource)
            routes = Routes(BoundedSite(root, private.max_body_size, reactor),
                            public.path, self.browser_factory, private.path, publisher_factory)
            self._add_listener("listener-shared", public.host, public.port, routes)
        else:
            public_root, private_root = Resource(), Resource()
            mount(public_root, public.path, UpgradeRequired())
            mount(private_root, private.path, private_resource)
            self._add_listener("listener-public", public.host, public.port, Routes(
                BoundedSite(public_root, private.max_body_size, reactor), public.path, self.browser_factory))
            self._add_listener("listener-private", private.host, private.port, Routes(
                BoundedSite(private_root, private.max_body_size, reactor),
                publisher_path=private.path, publishers=publisher_factory))

    def _authenticator(self):
        return TokenAuthenticator(lambda: self.private_key.value)

    def _origin_policy(self) -> OriginPolicy:
        """Configured origins; in pydio mode an empty list means pydio_url's origin only."""
        allowed = self.config.public.allowed_origins
        if not allowed and self.config.auth.mode == "pydio":
            allowed = (normalize_origin(self.config.auth.pydio_url),)
        return OriginPolicy(allowed)

    def _add_listener(self, name, host, port, routes):
        listener = ListenerService(server_endpoint(self._reactor, host, port),
                                   ListenerFactory(routes, self._reactor))
        listener.setName(name)
        listener.setServiceParent(self)

    def listening_port(self, name: str) -> int:
        """The port a named listener really listens on (for port 0 in tests)."""
        return self.getServiceNamed(name).port.getHost().port

    def startService(self):
        self._log.info("private key from {source}", source=self.private_key.source)
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
        await self.browser_factory.close_all()
        await self.broker.stop()


def makeService(options) -> PydioWSService:
    """twistd entry point."""
    from twisted.internet import reactor
    return PydioWSService(options.config, reactor)
