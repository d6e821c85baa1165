"""Configuration: one key table drives the INI file, environment, long options and docs.

Precedence, lowest first: the table's defaults, the INI file, the environment
(`PYDIO_WS_<SECTION>_<KEY>`, e.g. `PYDIO_WS_PRIVATE_KEY`), the command line
(`--<section>-<key>`, dashes for underscores; secrets have no command-line option).
`load_config` validates everything once and returns a frozen `Config`, or raises
`ConfigError` with one clear line.
"""

import configparser
import ipaddress
import os
import socket
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Optional
from urllib.parse import urlsplit

from pydio_ws.origins import normalize_origin

ENV_PREFIX = "PYDIO_WS_"


class ConfigError(Exception):
    """An invalid configuration; the message is the one line shown to the operator."""


@dataclass(frozen=True)
class Key:
    """One configuration key: where it lives, how to parse it, and what it means."""

    section: str
    name: str
    parse: Callable[[str], object]
    default: str
    help: str
    secret: bool = False
    reloadable: bool = True

    @property
    def env_var(self) -> str:
        return f"{ENV_PREFIX}{self.section}_{self.name}".upper()

    @property
    def option(self) -> str:
        return f"{self.section}-{self.name}".replace("_", "-")

    @property
    def label(self) -> str:
        return f"{self.section}.{self.name}"


# -- value parsers: each takes the raw string and returns the value or raises ValueError

def parse_str(raw: str) -> str:
    return raw.strip()


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def parse_port(raw: str) -> int:
    try:
        port = int(raw.strip())
    except ValueError:
        raise ValueError(f"expected a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return port


def parse_positive_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"expected a number of at least 1, got {value}")
    return value


def parse_seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {raw!r}") from None
    if not 0 <= value < 86400 * 365:
        raise ValueError(f"expected seconds >= 0, got {raw!r}")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024 ** 2, "mib": 1024 ** 2,
               "g": 1024 ** 3, "gib": 1024 ** 3}


def parse_size(raw: str) -> int:
    """A byte count, with an optional unit: 65536, 64k, 64KiB, 1M, 1MiB."""
    text = raw.strip().lower()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):].strip()
    if unit not in _SIZE_UNITS or not number.strip().isdigit():
        raise ValueError(f"expected a size such as 65536, 64KiB or 1MiB, got {raw!r}")
    value = int(number) * _SIZE_UNITS[unit]
    if value < 1:
        raise ValueError("expected a size of at least 1 byte")
    return value


def parse_url_path(raw: str) -> str:
    path = raw.strip()
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {raw!r}")
    if any(c in path for c in "?#; \t") or "//" in path:
        raise ValueError(f"path must be a plain URL path, got {raw!r}")
    if len(path) > 1 and path.endswith("/"):
        raise ValueError(f"path must not end with '/', got {raw!r}")
    return path


def parse_list(raw: str) -> tuple:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def parse_origins(raw: str) -> tuple:
    origins = []
    for origin in parse_list(raw):
        if urlsplit(origin).path not in ("", "/"):
            raise ValueError(f"origin must look like https://host[:port], got {origin!r}")
        try:
            origins.append(normalize_origin(origin))
        except ValueError:
            raise ValueError(f"origin must look like https://host[:port], got {origin!r}") from None
    return tuple(origins)


def parse_networks(raw: str) -> tuple:
    """IP addresses, CIDR networks or host names (resolved now) -> ip networks."""
    networks = []
    for entry in parse_list(raw):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(entry, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError):
            raise ValueError(f"{entry!r} is neither an IP, a CIDR network nor a known host name") from None
        networks.extend(ipaddress.ip_network(info[4][0]) for info in infos)
    return tuple(dict.fromkeys(networks))


def parse_auth_mode(raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in ("token", "pydio"):
        raise ValueError(f"expected token or pydio, got {raw!r}")
    return mode


def parse_http_url(raw: str) -> str:
    url = raw.strip()
    if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
        raise ValueError(f"expected an http:// or https:// URL, got {raw!r}")
    return url


def parse_broker_url(raw: str) -> str:
    """memory:// (one process), or redis://[[user]:password@]host[:port][/db] or rediss://."""
    # Imported here: the Redis client loads only where a broker URL is parsed.
    from pydio_ws.redis_backend import parse_redis_url, redact_url
    url = raw.strip()
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return url
    if scheme in ("redis", "rediss"):
        parse_redis_url(url)
        return url
    raise ValueError(f"expected memory://, redis:// or rediss://, got {redact_url(raw)!r}")


def parse_readable_file(raw: str) -> str:
    path = raw.strip()
    if path and not os.access(path, os.R_OK):
        raise ValueError(f"cannot read file {path!r}")
    return path


def default_generated_key_file() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "pydio-ws", "private.key")


KEYS = (
    Key("public", "host", parse_str, "localhost", "Interface the browser listener binds to.",
        reloadable=False),
    Key("public", "port", parse_port, "8090", "Port the browser listener binds to.", reloadable=False),
    Key("public", "path", parse_url_path, "/public", "WebSocket path for browsers.", reloadable=False),
    Key("public", "ssl", parse_bool, "false", "Serve wss:// (TLS 1.2+) to browsers.",
        reloadable=False),
    Key("public", "ssl_cert", parse_str, "", "PEM certificate, followed by its chain.", reloadable=False),
    Key("public", "ssl_key", parse_str, "", "PEM private key of ssl_cert.", reloadable=False),
    Key("public", "ssl_chain", parse_str, "", "Optional separate PEM chain file.", reloadable=False),
    Key("public", "ssl_client_ca", parse_str, "",
        "PEM CA(s): when set, client certificates are required and verified.", reloadable=False),
    Key("public", "allowed_origins", parse_origins, "",
        "Comma list of origins allowed to open a browser socket; empty = any "
        "(in pydio auth mode: only pydio_url's origin)."),
    Key("private", "host", parse_str, "localhost", "Interface the publisher listener binds to.",
        reloadable=False),
    Key("private", "port", parse_port, "8090",
        "Port of the publisher listener; equal host:port with public = one shared listener.",
        reloadable=False),
    Key("private", "path", parse_url_path, "/private", "Path of the publish endpoint.", reloadable=False),
    Key("private", "key", parse_str, "",
        "Shared private key; prefer key_file or PYDIO_WS_PRIVATE_KEY.", secret=True),
    Key("private", "key_file", parse_readable_file, "", "File holding the private key."),
    Key("private", "generated_key_file", parse_str, "",
        "Where a generated key is kept when no key is configured "
        "(default $XDG_STATE_HOME/pydio-ws/private.key or ~/.local/state/pydio-ws/private.key)."),
    Key("private", "authorized_hosts", parse_networks, "localhost, 127.0.0.1",
        "Comma list of IPs, CIDR networks or host names allowed to publish."),
    Key("private", "max_body_size", parse_size, "1MiB", "Largest publish body accepted (413 above)."),
    Key("private", "ssl", parse_bool, "false",
        "Serve https/wss on the private listener (a shared listener uses [public]'s TLS).", reloadable=False),
    Key("private", "ssl_cert", parse_str, "", "PEM certificate, followed by its chain.", reloadable=False),
    Key("private", "ssl_key", parse_str, "", "PEM private key of ssl_cert.", reloadable=False),
    Key("private", "ssl_chain", parse_str, "", "Optional separate PEM chain file.", reloadable=False),
    Key("private", "ssl_client_ca", parse_str, "",
        "PEM CA(s): when set, publishers must present a certificate it signed.", reloadable=False),
    Key("auth", "mode", parse_auth_mode, "token",
        "token (JWT signed with the private key) or pydio (forward cookies to pydio_url)."),
    Key("auth", "pydio_url", parse_http_url, "",
        "Pydio authentication URL, e.g. http://host/pydio/?get_action=ws_authenticate."),
    Key("auth", "verify_ssl", parse_bool, "true", "Verify the certificate of an https pydio_url."),
    Key("auth", "ca_file", parse_readable_file, "", "CA bundle trusted for pydio_url instead of the system's."),
    Key("auth", "timeout", parse_seconds, "5", "Seconds to wait for the Pydio host's answer."),
    Key("auth", "cache_ttl", parse_seconds, "10", "Seconds a successful cookie answer is reused; 0 disables."),
    Key("auth", "max_concurrent", parse_positive_int, "16", "Concurrent requests to the Pydio host at most."),
    Key("auth", "max_queued", parse_positive_int, "1000",
        "Browsers waiting for the Pydio host at most; more get 503 at once."),
    Key("limits", "handshake_timeout", parse_seconds, "10",
        "Seconds a client has to complete its opening handshake."),
    Key("limits", "ping_interval", parse_seconds, "30", "Seconds between pings to a browser; 0 disables."),
    Key("limits", "ping_timeout", parse_seconds, "10", "Seconds a browser has to answer a ping."),
    Key("limits", "close_timeout", parse_seconds, "5",
        "Seconds to wait for the peer's close frame before dropping the connection."),
    Key("limits", "shutdown_timeout", parse_seconds, "5",
        "Seconds a shutdown waits for browsers to close before dropping them."),
    Key("limits", "max_message_size", parse_size, "64KiB",
        "Largest frame or message a browser may send (1009 above)."),
    Key("limits", "max_connections", parse_positive_int, "20000",
        "Open browser connections at most (503 at the handshake above)."),
    Key("limits", "max_connections_per_ip", parse_positive_int, "1000",
        "Open browser connections per client IP at most (503 above)."),
    Key("limits", "max_pending_bytes", parse_size, "4MiB",
        "Unsent bytes a browser may fall behind before it is closed (1008, slow consumer)."),
    Key("limits", "max_auth_failures", parse_positive_int, "10",
        "Failed authentications or bad keys per IP within auth_failure_window before 429."),
    Key("limits", "auth_failure_window", parse_seconds, "60",
        "Seconds over which failed authentications are counted."),
    Key("limits", "trusted_proxies", parse_networks, "",
        "Proxies whose X-Forwarded-For gives the client IP (IPs, CIDRs or host names)."),
    Key("broker", "url", parse_broker_url, "memory://",
        "memory:// (one process) or redis://[:password@]host:port/db, rediss:// for TLS.",
        reloadable=False),
    Key("server", "workers", parse_positive_int, "1",
        "Processes sharing the listeners (SO_REUSEPORT); more than 1 needs a redis:// broker.",
        reloadable=False),
)

TLS_KEYS = ("ssl", "ssl_cert", "ssl_key", "ssl_chain", "ssl_client_ca")
SECTIONS = tuple(dict.fromkeys(key.section for key in KEYS))


class Section:
    """Read-only attribute view of one section's values."""

    __slots__ = ("_name", "_values")

    def __init__(self, name: str, values: Mapping):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no key {self._name}.{name}") from None

    def __setattr__(self, name, value):
        raise AttributeError("configuration is read-only")


class Config:
    """Validated, frozen configuration: `config.public.port`, `config.auth.mode`, ..."""

    def __init__(self, values: Mapping, source: Optional[str] = None,
                 overrides: Optional[Mapping] = None):
        self.source = source
        self.overrides = dict(overrides or {})
        self._values = dict(values)
        self._sections = {
            section: Section(section, {k.name: values[k.section, k.name] for k in KEYS if k.section == section})
            for section in SECTIONS
        }

    def __getattr__(self, name):
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def value(self, key: Key):
        return self._values[key.section, key.name]

    def reloaded(self, environ: Optional[Mapping] = None) -> "Config":
        """Read the same file, environment and overrides again (ConfigError if invalid)."""
        return load_config(self.source, environ, self.overrides)

    def with_restart_values_of(self, running: "Config") -> "Config":
        """This config, but with `running`'s values for keys that need a restart."""
        values = dict(self._values)
        for key in KEYS:
            if not key.reloadable:
                values[key.section, key.name] = running.value(key)
        return Config(values, self.source, self.overrides)

    @property
    def shared_listener(self) -> bool:
        """True when public and private are served by one listener."""
        return (self.public.host.lower(), self.public.port) == (self.private.host.lower(), self.private.port)

    @property
    def single_path(self) -> bool:
        """True for Pydio 6's setup: browsers and publishers on one path of one listener."""
        return self.shared_listener and self.public.path == self.private.path


def _read_ini(path: str) -> dict:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.optionxform = str
    try:
        with open(path, encoding="utf-8") as stream:
            parser.read_file(stream)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid INI: {first_line}") from None
    known = {(key.section, key.name) for key in KEYS}
    raw = {}
    for section in parser.sections():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]")
        for name, value in parser.items(section):
            if (section, name) not in known:
                raise ConfigError(f"{path}: unknown key {name!r} in [{section}]")
            raw[section, name] = value
    return raw


def load_config(path: Optional[str] = None, environ: Optional[Mapping] = None,
                overrides: Optional[Mapping] = None) -> Config:
    """Merge defaults < file < environment < overrides, validate, and freeze.

    `overrides` maps (section, name) to raw strings, as given on the command line.
    """
    environ = os.environ if environ is None else environ
    raw = {(key.section, key.name): key.default for key in KEYS}
    origin = {name: "default" for name in raw}
    if path:
        for name, value in _read_ini(path).items():
            raw[name], origin[name] = value, path
    for key in KEYS:
        if key.env_var in environ:
            raw[key.section, key.name] = environ[key.env_var]
            origin[key.section, key.name] = key.env_var
    for name, value in (overrides or {}).items():
        raw[name], origin[name] = value, "command line"
    values = {}
    for key in KEYS:
        try:
            values[key.section, key.name] = key.parse(raw[key.section, key.name])
        except ValueError as error:
            raise ConfigError(f"{key.label} ({origin[key.section, key.name]}): {error}") from None
    config = Config(values, source=path, overrides=overrides)
    _check_combination(config)
    return config


def _check_combination(config: Config) -> None:
    """Rules that involve several keys."""
    for label in ("public", "private"):
        side = getattr(config, label)
        if side.ssl and not (side.ssl_cert and side.ssl_key) and not (label == "private" and config.shared_listener):
            raise ConfigError(f"{label}.ssl = true needs {label}.ssl_cert and {label}.ssl_key")
    if config.shared_listener:
        for name in TLS_KEYS:
            private_value = getattr(config.private, name)
            if private_value and private_value != getattr(config.public, name):
                raise ConfigError(
                    f"private.{name} conflicts with public.{name}: a shared listener has one TLS "
                    "setting; set it under [public] only")
    if config.auth.mode == "pydio" and not config.auth.pydio_url:
        raise ConfigError("auth.pydio_url is required when auth.mode = pydio")
    if config.server.workers > 1 and urlsplit(config.broker.url).scheme == "memory":
        raise ConfigError(f"server.workers = {config.server.workers} needs a redis:// broker.url: "
                          "the memory broker cannot join processes")
    if config.shared_listener and config.public.path == config.private.path + "/status":
        raise ConfigError("public.path collides with the private status path")


def sample_ini() -> str:
    """The commented sample configuration, generated from the key table."""
    lines = ["# pydio-ws configuration. Every key is optional; shown values are the defaults.",
             "# Each key can also be set by the environment variable shown, or --section-key."]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key in (k for k in KEYS if k.section == section):
            lines.append(f"# {key.help}")
            lines.append(f"# env: {key.env_var}" + ("" if key.secret else f"   option: --{key.option}"))
            lines.append(f"{key.name} = {key.default}".rstrip() if not key.secret else f";{key.name} =")
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- config-table:start -->"
TABLE_END = "<!-- config-table:end -->"


def reference_table() -> str:
    """The README's configuration table (Markdown), generated from the key table."""
    lines = [TABLE_START,
             "| Section | Key | Default | Environment variable | Option | On SIGHUP | Meaning |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in KEYS:
        default = f"`{key.default}`" if key.default else "(empty)"
        option = "none (secret)" if key.secret else f"`--{key.option}`"
        reload = "applied" if key.reloadable else "restart"
        meaning = key.help.replace("|", "\\|")
        lines.append(f"| `{key.section}` | `{key.name}` | {default} | `{key.env_var}` | {option} "
                     f"| {reload} | {meaning} |")
    lines.append(TABLE_END)
    return "\n".join(lines)
