"""Tests for pydio_ws.commands: the browser's register:/unregister: text protocol."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from pydio_ws.commands import REGISTER, UNKNOWN, UNREGISTER, Command, parse_command


class ParseCommandTests(unittest.TestCase):
    """What each text frame means."""

    def test_register(self):
        """register:<id> asks for workspace <id>."""
        self.assertEqual(parse_command("register:1"), Command(REGISTER, "1"))

    def test_register_keeps_colons_in_the_id(self):
        """Everything after the first colon is the workspace id."""
        self.assertEqual(parse_command("register:ws:2"), Command(REGISTER, "ws:2"))

    def test_register_without_id_is_unknown(self):
        """register: with nothing after the colon is not a command."""
        self.assertEqual(parse_command("register:"), Command(UNKNOWN))

    def test_unregister_ignores_its_argument(self):
        """unregister: followed by anything, or nothing, stops listening."""
        for text in ("unregister:", "unregister:1", "unregister:anything at all"):
            self.assertEqual(parse_command(text), Command(UNREGISTER))

    def test_verbs_need_a_colon(self):
        """register and unregister without a colon are unknown."""
        self.assertEqual(parse_command("register"), Command(UNKNOWN))
        self.assertEqual(parse_command("unregister"), Command(UNKNOWN))

    def test_verbs_are_case_sensitive(self):
        """REGISTER:1 and " register:1" are unknown, as in the Pydio client."""
        self.assertEqual(parse_command("REGISTER:1"), Command(UNKNOWN))
        self.assertEqual(parse_command(" register:1"), Command(UNKNOWN))

    def test_other_text_is_unknown(self):
        """Empty text and other words are unknown."""
        for text in ("", ":", "hello", "ping:1"):
            self.assertEqual(parse_command(text).kind, UNKNOWN)

    @given(st.text())
    def test_never_raises(self, text):
        """Any text parses to a Command; only REGISTER carries a non-empty repo id."""
        command = parse_command(text)
        self.assertIn(command.kind, (REGISTER, UNREGISTER, UNKNOWN))
        self.assertEqual(command.repo_id is not None, command.kind == REGISTER)
        if command.kind == REGISTER:
            self.assertTrue(command.repo_id)

    @given(st.text(min_size=1))
    def test_register_round_trip(self, repo_id):
        """register:<id> gives back exactly <id> for any non-empty id."""
        self.assertEqual(parse_command(f"register:{repo_id}"), Command(REGISTER, repo_id))
