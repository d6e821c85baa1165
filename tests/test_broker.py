"""Tests for pydio_ws.broker: who receives which message, framed once."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from pydio_ws.broker import Broker, MemoryBackend
from pydio_ws.messages import ALL_REPOS, Message


class RecordingBackend(MemoryBackend):
    """The memory backend, also recording interest changes (test double of the backend seam)."""

    def __init__(self):
        super().__init__()
        self.interest = []

    def interest_changed(self, repo_id, interested):
        self.interest.append((repo_id, interested))


class Harness:
    """A started Broker whose frame function counts calls and whose recipients append."""

    def __init__(self, backend=None):
        self.frames = 0
        self.broker = Broker(self.frame, backend=backend)
        self.broker.start()

    def frame(self, message):
        self.frames += 1
        return ("frame", message.content)

    def attach(self, user="alice", group=None, repo=None):
        inbox = []
        subscriber = self.broker.attach(user, group, inbox.append)
        if repo is not None:
            subscriber.register(repo)
        return subscriber, inbox

    def publish(self, *messages):
        published = []
        self.broker.publish(messages).addCallback(published.append)
        return published[0]


def received(inbox):
    return [content for _, content in inbox]


class DeliveryTests(unittest.TestCase):
    """Matching by workspace, user and group."""

    def setUp(self):
        self.h = Harness()

    def test_delivery_by_workspace(self):
        """A message reaches the subscribers registered on its workspace only."""
        _, one = self.h.attach(repo="1")
        _, two = self.h.attach(repo="2")
        self.assertEqual(self.h.publish(Message("1", "a")), 1)
        self.assertEqual((received(one), received(two)), (["a"], []))

    def test_delivery_by_user(self):
        """A message with USER_ID reaches that user's subscribers only."""
        _, alice = self.h.attach("alice", repo="1")
        _, bob = self.h.attach("bob", repo="1")
        self.h.publish(Message("1", "for-bob", user_id="bob"))
        self.assertEqual((received(alice), received(bob)), ([], ["for-bob"]))

    def test_delivery_by_group(self):
        """A message with GROUP_PATH reaches subscribers with exactly that group path."""
        _, sales = self.h.attach("alice", "/sales", repo="1")
        _, sub = self.h.attach("carol", "/sales/east", repo="1")
        _, nogroup = self.h.attach("dave", None, repo="1")
        self.h.publish(Message("1", "g", group_path="/sales"))
        self.assertEqual((received(sales), received(sub), received(nogroup)), (["g"], [], []))

    def test_delivery_by_user_and_group(self):
        """A message with USER_ID and GROUP_PATH needs both to match."""
        _, match = self.h.attach("alice", "/sales", repo="1")
        _, other_group = self.h.attach("alice", "/hr", repo="1")
        _, other_user = self.h.attach("bob", "/sales", repo="1")
        self.h.publish(Message("1", "ug", user_id="alice", group_path="/sales"))
        self.assertEqual([received(i) for i in (match, other_group, other_user)], [["ug"], [], []])

    def test_all_workspaces_reaches_every_attached(self):
        """A "*" message reaches every attached subscriber, registered or not."""
        inboxes = [self.h.attach(repo=repo)[1] for repo in ("1", "2", None)]
        self.assertEqual(self.h.broker.deliver_local(Message(ALL_REPOS, "all")), 3)
        self.assertEqual([received(i) for i in inboxes], [["all"]] * 3)

    def test_all_workspaces_still_filters_user(self):
        """A "*" message with USER_ID reaches only that user."""
        _, alice = self.h.attach("alice", repo="1")
        _, bob = self.h.attach("bob")
        self.h.publish(Message(ALL_REPOS, "a", user_id="alice"))
        self.assertEqual((received(alice), received(bob)), (["a"], []))

    def test_unregistered_gets_only_all_workspaces(self):
        """An attached subscriber that never registered gets "*" messages only."""
        _, inbox = self.h.attach()
        self.h.publish(Message("1", "skipped"), Message(ALL_REPOS, "all"))
        self.assertEqual(received(inbox), ["all"])

    def test_unregister_stops_workspace_messages(self):
        """After unregister the subscriber gets "*" messages only."""
        subscriber, inbox = self.h.attach(repo="1")
        subscriber.unregister()
        self.h.publish(Message("1", "skipped"), Message(ALL_REPOS, "all"))
        self.assertEqual(received(inbox), ["all"])
        self.assertEqual(self.h.broker.registered_counts(), {})

    def test_reregister_moves(self):
        """A second register moves the subscriber to the new workspace."""
        subscriber, inbox = self.h.attach(repo="1")
        subscriber.register("2")
        self.h.publish(Message("1", "old"), Message("2", "new"))
        self.assertEqual(received(inbox), ["new"])
        self.assertEqual(self.h.broker.registered_counts(), {"2": 1})

    def test_detach_stops_delivery(self):
        """A detached subscriber receives nothing, not even "*" messages."""
        subscriber, inbox = self.h.attach(repo="1")
        subscriber.detach()
        self.assertEqual(self.h.publish(Message("1", "a"), Message(ALL_REPOS, "b")), 2)
        self.assertEqual(inbox, [])

    def test_detach_is_idempotent(self):
        """Detaching twice counts the subscriber out once."""
        subscriber, _ = self.h.attach(repo="1")
        self.h.attach(repo="1")
        subscriber.detach()
        subscriber.detach()
        self.assertEqual(self.h.broker.attached_count, 1)
        self.assertEqual(self.h.broker.registered_counts(), {"1": 1})

    def test_register_after_detach_is_harmless(self):
        """register and unregister on a detached subscriber change nothing and deliver nothing."""
        subscriber, inbox = self.h.attach(repo="1")
        subscriber.detach()
        subscriber.register("2")
        subscriber.unregister()
        self.h.publish(Message("2", "x"), Message(ALL_REPOS, "y"))
        self.assertEqual(inbox, [])
        self.assertEqual((self.h.broker.attached_count, self.h.broker.registered_counts()), (0, {}))

    def test_counts(self):
        """registered_counts counts per workspace; attached_count counts everyone attached."""
        self.h.attach(repo="1")
        self.h.attach(repo="1")
        self.h.attach(repo="2")
        self.h.attach()
        self.assertEqual(self.h.broker.registered_counts(), {"1": 2, "2": 1})
        self.assertEqual(self.h.broker.attached_count, 4)

    def test_registering_same_workspace_twice_counts_once(self):
        """register on the current workspace again leaves the counts unchanged."""
        subscriber, _ = self.h.attach(repo="1")
        subscriber.register("1")
        self.assertEqual(self.h.broker.registered_counts(), {"1": 1})

    def test_per_publisher_order_is_kept(self):
        """Messages of one publish arrive in the order they were published."""
        _, inbox = self.h.attach(repo="1")
        self.h.publish(*(Message("1", str(n)) for n in range(20)))
        self.h.publish(Message(ALL_REPOS, "20"), Message("1", "21"))
        self.assertEqual(received(inbox), [str(n) for n in range(22)])

    def test_publish_counts_messages_published(self):
        """publish fires with the number of messages published, recipients or not."""
        self.assertEqual(self.h.publish(Message("1", "a"), Message("2", "b")), 2)


class FramingTests(unittest.TestCase):
    """A message is framed once, and only when someone receives it."""

    def setUp(self):
        self.h = Harness()

    def test_frame_once_for_many_recipients(self):
        """The frame function runs once per message and every recipient gets the same object."""
        inboxes = [self.h.attach(user=f"u{n}", repo="1")[1] for n in range(5)]
        self.h.publish(Message("1", "a"))
        self.assertEqual(self.h.frames, 1)
        frames = [inbox[0] for inbox in inboxes]
        self.assertTrue(all(frame is frames[0] for frame in frames))

    def test_no_frame_without_recipients(self):
        """A message nobody receives is never framed."""
        self.h.attach(repo="2")
        self.assertEqual(self.h.broker.deliver_local(Message("1", "a")), 0)
        self.assertEqual(self.h.frames, 0)

    def test_deliver_local_returns_recipient_count(self):
        """deliver_local returns how many subscribers received the message."""
        self.h.attach(repo="1")
        self.h.attach(repo="1")
        self.assertEqual(self.h.broker.deliver_local(Message("1", "a")), 2)


class FailingDeliveryTests(unittest.TestCase):
    """One broken recipient does not stop the others."""

    def test_failing_deliver_does_not_stop_others(self):
        """A deliver callable that raises is logged and the other recipients still get the frame."""
        h = Harness()
        _, before = h.attach("a", repo="1")

        def broken(frame):
            raise RuntimeError("connection gone")

        h.broker.attach("b", None, broken).register("1")
        _, after = h.attach("c", repo="1")
        self.assertEqual(h.broker.deliver_local(Message("1", "x")), 2)
        self.assertEqual((received(before), received(after)), (["x"], ["x"]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class InterestTests(unittest.TestCase):
    """The backend hears when a workspace gains its first or loses its last subscriber."""

    def setUp(self):
        self.backend = RecordingBackend()
        self.h = Harness(self.backend)

    def test_first_and_last_subscriber(self):
        """interest_changed fires on the first register and the last leave of a workspace only."""
        first, _ = self.h.attach(repo="1")
        second, _ = self.h.attach(repo="1")
        self.assertEqual(self.backend.interest, [("1", True)])
        first.unregister()
        self.assertEqual(self.backend.interest, [("1", True)])
        second.detach()
        self.assertEqual(self.backend.interest, [("1", True), ("1", False)])

    def test_move_changes_interest_of_both_workspaces(self):
        """Moving the only subscriber from 1 to 2 drops interest in 1 and gains it in 2."""
        subscriber, _ = self.h.attach(repo="1")
        subscriber.register("2")
        self.assertEqual(self.backend.interest, [("1", True), ("1", False), ("2", True)])

    def test_unregistered_attach_and_detach_change_no_interest(self):
        """Attaching and detaching without registering never signals interest."""
        subscriber, _ = self.h.attach()
        subscriber.detach()
        self.assertEqual(self.backend.interest, [])


USERS = st.sampled_from(["alice", "bob", "carol"])
GROUPS = st.none() | st.sampled_from(["/a", "/b"])
REPOS = st.sampled_from(["1", "2", "3", ALL_REPOS])
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("attach"), USERS, GROUPS),
    st.tuples(st.just("register"), st.integers(0, 9), REPOS),
    st.tuples(st.just("unregister"), st.integers(0, 9)),
    st.tuples(st.just("detach"), st.integers(0, 9)),
    st.tuples(st.just("publish"), REPOS, st.none() | USERS, GROUPS),
), max_size=40)


class BrokerModelTests(unittest.TestCase):
    """The index agrees with a brute-force filter over live subscribers."""

    @given(OPERATIONS)
    def test_recipients_equal_brute_force(self, operations):
        """For any sequence of operations each message reaches exactly the matching live subscribers."""
        h = Harness()
        subscribers = []  # [subscriber, inbox, user, group, repo, alive]
        for number, operation in enumerate(operations):
            kind = operation[0]
            if kind == "attach":
                subscriber, inbox = h.attach(operation[1], operation[2])
                subscribers.append([subscriber, inbox, operation[1], operation[2], None, True])
                continue
            if kind == "publish":
                _, repo, user, group = operation
                expected = {
                    index for index, (_, _, s_user, s_group, s_repo, alive) in enumerate(subscribers)
                    if alive and (repo == ALL_REPOS or repo == s_repo)
                    and (user is None or user == s_user) and (group is None or group == s_group)
                }
                before = [len(entry[1]) for entry in subscribers]
                delivered = h.broker.deliver_local(Message(repo, str(number), user, group))
                got = {index for index, entry in enumerate(subscribers)
                       if len(entry[1]) > before[index]}
                self.assertEqual(got, expected)
                self.assertEqual(delivered, len(expected))
                for index in got:
                    self.assertEqual(subscribers[index][1][-1], ("frame", str(number)))
                continue
            if not subscribers:
                continue
            entry = subscribers[operation[1] % len(subscribers)]
            if kind == "register":
                entry[0].register(operation[2])
                if entry[5]:
                    entry[4] = operation[2]
            elif kind == "unregister":
                entry[0].unregister()
                if entry[5]:
                    entry[4] = None
            else:
                entry[0].detach()
                entry[5] = False
        live = [entry for entry in subscribers if entry[5]]
        counts = {}
        for entry in live:
            if entry[4] is not None:
                counts[entry[4]] = counts.get(entry[4], 0) + 1
        self.assertEqual(h.broker.registered_counts(), counts)
        self.assertEqual(h.broker.attached_count, len(live))
