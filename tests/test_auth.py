"""Tests for pydio_ws.auth: browser tokens and the Identity they carry."""

import time

import jwt
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from pydio_ws.auth import (AuthError, HandshakeRequest, Identity, TokenAuthenticator,
                           identity_from_claims, make_token)

KEY = "auth-test-private-key-0123456789abcdef"


def authenticator(key: str = KEY) -> TokenAuthenticator:
    return TokenAuthenticator(lambda: key)


def signed(claims, key: str = KEY) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


class TokenTests(unittest.TestCase):
    """TokenAuthenticator.identify on good and bad tokens."""

    def assertRefused(self, token, reason: str):
        with self.assertRaises(AuthError) as caught:
            authenticator().identify(token)
        self.assertEqual((caught.exception.status, caught.exception.reason), (401, reason))

    def test_round_trip(self):
        """A token from make_token identifies its user, group and workspace rights."""
        token = make_token(KEY, "alice", {"1": "rw", "2": "r"}, time.time() + 60, "/sales")
        identity = authenticator().identify(token)
        self.assertEqual((identity.user_id, identity.group_path, dict(identity.repos)),
                         ("alice", "/sales", {"1": "rw", "2": "r"}))

    def test_round_trip_without_group(self):
        """A token without a group identifies a user with no group path."""
        identity = authenticator().identify(make_token(KEY, "bob", {}, time.time() + 60))
        self.assertEqual((identity.user_id, identity.group_path, dict(identity.repos)), ("bob", None, {}))

    def test_missing_token(self):
        """No token, or an empty one, is 401 "missing token"."""
        self.assertRefused(None, "missing token")
        self.assertRefused("", "missing token")

    def test_wrong_key(self):
        """A token signed with another key is 401 with the signature failure."""
        token = make_token("another-key-0123456789abcdef0123", "alice", {}, time.time() + 60)
        self.assertRefused(token, "invalid token: Signature verification failed")

    def test_expired(self):
        """A token past its exp is 401 "token expired"."""
        self.assertRefused(make_token(KEY, "alice", {}, time.time() - 60), "token expired")

    def test_missing_exp(self):
        """A token without exp is 401 naming the missing claim."""
        self.assertRefused(signed({"sub": "alice", "repos": {}}),
                           'invalid token: Token is missing the "exp" claim')

    def test_missing_sub(self):
        """A token without sub is 401 naming the missing claim."""
        self.assertRefused(signed({"exp": int(time.time()) + 60}),
                           'invalid token: Token is missing the "sub" claim')

    def test_alg_none_is_refused(self):
        """An unsigned token (alg "none") is 401 whatever it claims."""
        token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, "repos": {"1": "rw"}},
                           None, algorithm="none")
        self.assertRefused(token, "invalid token: The specified alg value is not allowed")

    def test_other_hmac_algorithm_is_refused(self):
        """A token signed with HS512 is 401 before its signature is looked at: only HS256 is accepted."""
        token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, KEY * 2, algorithm="HS512")
        self.assertRefused(token, "invalid token: The specified alg value is not allowed")

    def test_garbage_token(self):
        """A token that is not a JWT is 401 "invalid token: ..."."""
        with self.assertRaises(AuthError) as caught:
            authenticator().identify("not.a.jwt")
        self.assertEqual(caught.exception.status, 401)
        self.assertTrue(caught.exception.reason.startswith("invalid token: "))

    def test_sub_not_a_string(self):
        """A numeric sub is 401."""
        self.assertRefused(signed({"sub": 7, "exp": int(time.time()) + 60}),
                           "invalid token: Subject must be a string")

    def test_group_not_a_string(self):
        """A non-string group is 401 "token group is not a string"."""
        self.assertRefused(signed({"sub": "alice", "group": ["/a"], "exp": int(time.time()) + 60}),
                           "token group is not a string")

    def test_repos_not_an_object(self):
        """repos as a list is 401 "token repos is not an object of strings"."""
        self.assertRefused(signed({"sub": "alice", "repos": ["1"], "exp": int(time.time()) + 60}),
                           "token repos is not an object of strings")

    def test_repos_acl_not_a_string(self):
        """A repos acl that is not a string is 401 "token repos is not an object of strings"."""
        self.assertRefused(signed({"sub": "alice", "repos": {"1": 4}, "exp": int(time.time()) + 60}),
                           "token repos is not an object of strings")

    def test_key_is_read_at_each_use(self):
        """The authenticator asks its key source each time, so a changed key applies."""
        keys = [KEY]
        auth = TokenAuthenticator(lambda: keys[0])
        token = make_token(KEY, "alice", {}, time.time() + 60)
        auth.identify(token)
        keys[0] = "rotated-key-0123456789abcdef0123456"
        with self.assertRaises(AuthError):
            auth.identify(token)

    @given(st.text() | st.binary().map(lambda b: b.decode("latin-1")))
    def test_arbitrary_text_raises_only_auth_error(self, text):
        """identify() on arbitrary text raises AuthError(401) and nothing else."""
        with self.assertRaises(AuthError) as caught:
            authenticator().identify(text)
        self.assertEqual(caught.exception.status, 401)

    @given(st.dictionaries(st.sampled_from(["sub", "group", "repos", "exp", "nbf", "iat"]),
                           st.none() | st.booleans() | st.integers() | st.text()
                           | st.lists(st.text(), max_size=2)
                           | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(),
                                             max_size=2)))
    def test_signed_arbitrary_claims_give_identity_or_auth_error(self, claims):
        """A correctly signed token with arbitrary claims gives an Identity or AuthError(401)."""
        try:
            identity = authenticator().identify(signed(claims))
        except AuthError as error:
            self.assertEqual(error.status, 401)
            return
        self.assertIsInstance(identity.user_id, str)


class IdentityTests(unittest.TestCase):
    """Identity rights and shape."""

    def test_can_read(self):
        """"r" and "rw" grant read; "w" and a missing workspace do not."""
        identity = Identity("alice", None, {"1": "r", "2": "rw", "3": "w"})
        self.assertEqual([identity.can_read(repo) for repo in ("1", "2", "3", "4")],
                         [True, True, False, False])

    def test_repos_are_read_only(self):
        """An Identity's repos cannot be changed after creation."""
        rights = {"1": "r"}
        identity = Identity("alice", None, rights)
        rights["2"] = "rw"
        self.assertFalse(identity.can_read("2"))
        with self.assertRaises(TypeError):
            identity.repos["3"] = "r"

    def test_empty_group_claim_means_no_group(self):
        """An empty group claim gives an Identity without group path."""
        self.assertIsNone(identity_from_claims({"sub": "alice", "group": ""}).group_path)


class HandshakeTokenTests(unittest.TestCase):
    """Where authenticate() finds the token in a handshake."""

    def request(self, headers=None, params=None) -> HandshakeRequest:
        return HandshakeRequest("127.0.0.1", headers or {}, params or {})

    async def test_token_from_query_parameter(self):
        """?token=JWT identifies the browser."""
        token = make_token(KEY, "alice", {"1": "r"}, time.time() + 60)
        identity = await defer.Deferred.fromCoroutine(
            authenticator().authenticate(self.request(params={"token": [token]})))
        self.assertEqual(identity.user_id, "alice")

    async def test_token_from_bearer_header(self):
        """Authorization: Bearer JWT identifies the browser, whatever the scheme's case."""
        token = make_token(KEY, "bob", {"1": "r"}, time.time() + 60)
        for scheme in ("Bearer", "bearer"):
            identity = await defer.Deferred.fromCoroutine(authenticator().authenticate(
                self.request(headers={"authorization": f"{scheme} {token}"})))
            self.assertEqual(identity.user_id, "bob")

    async def test_no_token_in_handshake(self):
        """A handshake without token, or with Basic auth, is refused 401 "missing token"."""
        for request in (self.request(), self.request(headers={"authorization": "Basic YTpi"}),
                        self.request(headers={"authorization": "Bearer "})):
            with self.assertRaises(AuthError) as caught:
                await defer.Deferred.fromCoroutine(authenticator().authenticate(request))
            self.assertEqual((caught.exception.status, caught.exception.reason), (401, "missing token"))
