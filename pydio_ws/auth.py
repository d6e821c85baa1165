"""Who a browser connection is: the Identity, and the token authenticator.

A browser is identified once, at the WebSocket opening handshake. An authenticator takes
the handshake's `HandshakeRequest` and returns an `Identity`, or raises `AuthError`
carrying the HTTP status the handshake is refused with. The cookie-forwarding
authenticator for a Pydio host lives in `pydio_ws.pydio_auth`.
"""

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

import jwt

TOKEN_ALGORITHM = "HS256"


class AuthError(Exception):
    """A refused identification: `status` is the HTTP status, `reason` says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """A user as the server knows it: id, group path and workspace -> acl rights."""

    user_id: str
    group_path: Optional[str] = None
    repos: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "repos", MappingProxyType(dict(self.repos)))

    def can_read(self, repo_id: str) -> bool:
        """True when the acl of `repo_id` grants read ("r")."""
        return "r" in self.repos.get(repo_id, "")


@dataclass(frozen=True)
class HandshakeRequest:
    """What an authenticator may look at: peer address, lower-cased headers, query."""

    peer_host: str
    headers: Mapping[str, str]
    params: Mapping[str, list]


def _token_from(request: HandshakeRequest) -> Optional[str]:
    """The JWT from `?token=` or an `Authorization: Bearer` header, if any."""
    tokens = request.params.get("token")
    if tokens:
        return tokens[0]
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def identity_from_claims(claims: Mapping) -> Identity:
    """Build an Identity from verified token claims; AuthError(401) on a bad shape."""
    user_id = claims.get("sub")
    group_path = claims.get("group")
    repos = claims.get("repos", {})
    if not isinstance(user_id, str) or not user_id:
        raise AuthError(401, "token has no user (sub)")
    if group_path is not None and not isinstance(group_path, str):
        raise AuthError(401, "token group is not a string")
    if not isinstance(repos, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in repos.items()
    ):
        raise AuthError(401, "token repos is not an object of strings")
    return Identity(user_id, group_path or None, repos)


class TokenAuthenticator:
    """Identify browsers by a JWT (HS256) signed with the private key."""

    def __init__(self, key_source):
        """`key_source()` returns the current private key (it may change on reload)."""
        self._key_source = key_source

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Return the Identity of the token in `request`, or raise AuthError(401)."""
        return self.identify(_token_from(request))

    def identify(self, token: Optional[str]) -> Identity:
        """Verify `token` and return its Identity."""
        if not token:
            raise AuthError(401, "missing token")
        try:
            claims = jwt.decode(
                token,
                self._key_source(),
                algorithms=[TOKEN_ALGORITHM],
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidTokenError as error:
            raise AuthError(401, f"invalid token: {error}") from None
        return identity_from_claims(claims)


def make_token(key: str, user_id: str, repos: Mapping[str, str], expires_at: float,
               group_path: Optional[str] = None) -> str:
    """Mint a token for `user_id` with `repos` rights, valid until `expires_at` (epoch)."""
    claims = {"sub": user_id, "repos": dict(repos), "exp": int(expires_at)}
    if group_path:
        claims["group"] = group_path
    return jwt.encode(claims, key, algorithm=TOKEN_ALGORITHM)
