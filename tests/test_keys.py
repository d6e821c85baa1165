"""Tests for pydio_ws.keys: which private key the server and the CLI use."""

import os
import shutil
import stat
import tempfile

from twisted.trial import unittest

from pydio_ws.config import ConfigError, load_config
from pydio_ws.keys import GENERATED_KEY_BYTES, resolve_private_key

KEY = "configured-private-key-0123456789"


class ResolvePrivateKeyTests(unittest.TestCase):
    """Configured key, key_file, or the generated key file, in that order."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="pydio-ws-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.generated = os.path.join(self.dir, "state", "pydio-ws", "private.key")

    def config(self, **settings):
        overrides = {("private", "generated_key_file"): self.generated}
        overrides.update({("private", name): value for name, value in settings.items()})
        return load_config(environ={}, overrides=overrides)

    def write_key_file(self, text: str) -> str:
        path = os.path.join(self.dir, "key.txt")
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(text)
        return path

    def test_configured_key_wins(self):
        """private.key is used even when a key_file is configured too."""
        key = resolve_private_key(self.config(key=KEY, key_file=self.write_key_file("from-file")))
        self.assertEqual((key.value, key.source), (KEY, "configuration"))
        self.assertFalse(os.path.exists(self.generated))

    def test_key_file_is_read_and_stripped(self):
        """The key_file's content is the key, without surrounding whitespace."""
        path = self.write_key_file("  from-file-key\n\n")
        key = resolve_private_key(self.config(key_file=path))
        self.assertEqual((key.value, key.source), ("from-file-key", path))

    def test_empty_key_file_is_refused(self):
        """A key_file holding only whitespace raises ConfigError naming the file."""
        path = self.write_key_file(" \n")
        with self.assertRaises(ConfigError) as caught:
            resolve_private_key(self.config(key_file=path))
        self.assertIn(path, str(caught.exception))
        self.assertIn("empty", str(caught.exception))

    def test_key_is_generated_into_a_0600_file(self):
        """Without a configured key a random key is written to generated_key_file with mode 0600."""
        key = resolve_private_key(self.config())
        self.assertEqual(key.source, self.generated)
        self.assertEqual(stat.S_IMODE(os.stat(self.generated).st_mode), 0o600)
        with open(self.generated, encoding="utf-8") as stream:
            self.assertEqual(stream.read().strip(), key.value)
        self.assertGreaterEqual(len(key.value), GENERATED_KEY_BYTES)

    def test_generated_key_is_reused(self):
        """The next resolution reads the same generated key back."""
        first = resolve_private_key(self.config())
        second = resolve_private_key(self.config())
        self.assertEqual(first.value, second.value)
        self.assertEqual(resolve_private_key(self.config(), create=False).value, first.value)

    def test_generated_keys_differ_between_files(self):
        """Two fresh key files get two different random keys."""
        first = resolve_private_key(self.config()).value
        self.generated = os.path.join(self.dir, "other.key")
        self.assertNotEqual(resolve_private_key(self.config()).value, first)

    def test_no_key_without_create_raises(self):
        """create=False raises ConfigError naming the missing file and creates nothing."""
        with self.assertRaises(ConfigError) as caught:
            resolve_private_key(self.config(), create=False)
        self.assertIn(self.generated, str(caught.exception))
        self.assertFalse(os.path.exists(self.generated))

    def test_environment_key_is_a_configured_key(self):
        """PYDIO_WS_PRIVATE_KEY is used as the configured key."""
        config = load_config(environ={"PYDIO_WS_PRIVATE_KEY": KEY},
                             overrides={("private", "generated_key_file"): self.generated})
        self.assertEqual(resolve_private_key(config).value, KEY)

    def test_repr_does_not_show_the_key(self):
        """repr() and str() of a PrivateKey show its source, never its value."""
        for key in (resolve_private_key(self.config(key=KEY)), resolve_private_key(self.config())):
            self.assertNotIn(key.value, repr(key))
            self.assertNotIn(key.value, str(key))
            self.assertIn(key.source, repr(key))
