"""Subscriptions and dispatch: who gets which message. A plain object, no protocols.

Every authenticated browser connection is *attached* as a `Subscriber` with its user id,
group path and a delivery callable; `register(repo_id)` makes it listen to a workspace.
Publishing goes through a backend (`MemoryBackend` here, one process); the backend hands
each message back to `Broker.deliver_local`, which delivers to this process's matches.

Matching is a single dictionary lookup per message. Each subscriber is indexed under
every (repo, user, group) key a message could carry and still reach it, with `None`
for "any"; a message's key is (REPO_ID or "*", USER_ID, GROUP_PATH). The message is
framed once (the injected `frame` callable) and the same frame goes to every recipient.
"""

from typing import Callable, Dict, Iterable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from pydio_ws.messages import ALL_REPOS, Message


class Subscriber:
    """One attached connection: identity, current workspace and delivery callable."""

    __slots__ = ("user_id", "group_path", "deliver", "repo_id", "_broker", "_keys")

    def __init__(self, broker: "Broker", user_id: str, group_path: Optional[str],
                 deliver: Callable[[object], None]):
        self._broker = broker
        self.user_id = user_id
        self.group_path = group_path
        self.deliver = deliver
        self.repo_id: Optional[str] = None
        self._keys: tuple = ()

    def register(self, repo_id: str) -> None:
        """Listen to `repo_id`, replacing the previous workspace."""
        if self._broker is not None:
            self._broker._reindex(self, repo_id)

    def unregister(self) -> None:
        """Stop listening to any workspace (messages for all workspaces still arrive)."""
        if self._broker is not None:
            self._broker._reindex(self, None)

    def detach(self) -> None:
        """Forget this connection; nothing is delivered to it afterwards."""
        if self._broker is not None:
            self._broker._detach(self)

    def index_keys(self, repo_id: Optional[str]) -> tuple:
        """Every message key that reaches this subscriber while on `repo_id`."""
        repos = (ALL_REPOS,) if repo_id is None else (ALL_REPOS, repo_id)
        groups = (None,) if self.group_path is None else (None, self.group_path)
        return tuple(dict.fromkeys(
            (repo, user, group)
            for repo in repos for user in (None, self.user_id) for group in groups
        ))


class MemoryBackend:
    """The single-process backend: a published message is delivered locally at once."""

    def __init__(self):
        self._deliver: Optional[Callable[[Message], int]] = None

    def start(self, deliver: Callable[[Message], int]):
        self._deliver = deliver
        return defer.succeed(None)

    def stop(self):
        return defer.succeed(None)

    def publish(self, messages: Iterable[Message]):
        """Deliver `messages` in order; fires with how many were published."""
        count = 0
        for message in messages:
            self._deliver(message)
            count += 1
        return defer.succeed(count)

    def interest_changed(self, repo_id: str, interested: bool) -> None:
        """A workspace gained its first or lost its last local subscriber (no-op here)."""

    @property
    def state(self) -> str:
        return "up"


class Broker:
    """Holds subscribers and dispatches published messages to the matching ones."""

    _log = Logger()

    def __init__(self, frame: Callable[[Message], object], backend=None, stats=None):
        """`frame(message)` builds the bytes (or prepared frame) handed to recipients."""
        self._frame = frame
        self.backend = backend or MemoryBackend()
        self._stats = stats
        self._index: Dict[tuple, Dict[Subscriber, None]] = {}
        self._repo_counts: Dict[str, int] = {}
        self._attached = 0

    def start(self):
        return self.backend.start(self.deliver_local)

    def stop(self):
        return self.backend.stop()

    def attach(self, user_id: str, group_path: Optional[str],
               deliver: Callable[[object], None]) -> Subscriber:
        """Add a connection; it receives all-workspace messages until it registers."""
        subscriber = Subscriber(self, user_id, group_path, deliver)
        self._attached += 1
        self._set_keys(subscriber, subscriber.index_keys(None))
        return subscriber

    def publish(self, messages: Iterable[Message]):
        """Publish through the backend; fires with the count published."""
        return self.backend.publish(list(messages))

    def deliver_local(self, message: Message) -> int:
        """Deliver `message` to this process's matching subscribers; returns how many."""
        recipients = self._index.get((message.repo_id, message.user_id, message.group_path))
        if not recipients:
            return 0
        frame = self._frame(message)
        delivered = 0
        for subscriber in tuple(recipients):
            try:
                subscriber.deliver(frame)
                delivered += 1
            except Exception:
                self._log.failure("delivery to {user_id} failed", user_id=subscriber.user_id)
        if self._stats is not None:
            self._stats.delivered += delivered
        return delivered

    @property
    def attached_count(self) -> int:
        return self._attached

    def registered_counts(self) -> Dict[str, int]:
        """Workspace id -> number of connections registered on it."""
        return dict(self._repo_counts)

    def _reindex(self, subscriber: Subscriber, repo_id: Optional[str]) -> None:
        if subscriber.repo_id == repo_id:
            return
        self._count_repo(subscriber.repo_id, -1)
        subscriber.repo_id = repo_id
        self._count_repo(repo_id, +1)
        self._set_keys(subscriber, subscriber.index_keys(repo_id))

    def _detach(self, subscriber: Subscriber) -> None:
        self._count_repo(subscriber.repo_id, -1)
        self._set_keys(subscriber, ())
        subscriber._broker = None
        self._attached -= 1

    def _count_repo(self, repo_id: Optional[str], change: int) -> None:
        if repo_id is None:
            return
        count = self._repo_counts.get(repo_id, 0) + change
        if count:
            self._repo_counts[repo_id] = count
        else:
            del self._repo_counts[repo_id]
        if count == (1 if change > 0 else 0):
            self.backend.interest_changed(repo_id, change > 0)

    def _set_keys(self, subscriber: Subscriber, keys: tuple) -> None:
        for key in subscriber._keys:
            bucket = self._index[key]
            del bucket[subscriber]
            if not bucket:
                del self._index[key]
        for key in keys:
            self._index.setdefault(key, {})[subscriber] = None
        subscriber._keys = keys
