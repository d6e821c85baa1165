"""Finding the private key: configured, read from key_file, or generated once and kept.

The server, `pydio-ws token` and `pydio-ws publish` all call `resolve_private_key`, so
they agree on the key without it ever appearing on a command line.
"""

import os
import secrets
from dataclasses import dataclass

from pydio_ws.config import Config, ConfigError, default_generated_key_file

GENERATED_KEY_BYTES = 32


@dataclass(frozen=True)
class PrivateKey:
    """The key and where it came from (a description safe to log)."""

    value: str
    source: str

    def __repr__(self):
        return f"PrivateKey(source={self.source!r})"


def generated_key_path(config: Config) -> str:
    return config.private.generated_key_file or default_generated_key_file()


def resolve_private_key(config: Config, create: bool = True) -> PrivateKey:
    """Return the configured key, or the generated one (created if `create`)."""
    if config.private.key:
        return PrivateKey(config.private.key, "configuration")
    if config.private.key_file:
        return PrivateKey(_read_key(config.private.key_file), config.private.key_file)
    path = generated_key_path(config)
    if os.path.exists(path):
        return PrivateKey(_read_key(path), path)
    if not create:
        raise ConfigError(f"no private key configured and no generated key at {path}")
    return PrivateKey(_create_key(path), path)


def _read_key(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as stream:
            key = stream.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read private key file {path}: {error}") from None
    if not key:
        raise ConfigError(f"private key file {path} is empty")
    return key


def _create_key(path: str) -> str:
    key = secrets.token_urlsafe(GENERATED_KEY_BYTES)
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    except OSError as error:
        raise ConfigError(f"cannot create private key file {path}: {error.strerror}") from None
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(key + "\n")
    return key
