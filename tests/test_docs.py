"""Documentation derived from the key table stays in step with it."""

from pathlib import Path

from twisted.trial import unittest

from pydio_ws.config import TABLE_END, TABLE_START, reference_table

ROOT = Path(__file__).resolve().parent.parent


class ReadmeTests(unittest.TestCase):
    """The README's configuration reference."""

    def test_readme_table_matches_the_key_table(self):
        """The table between the README's markers is exactly reference_table() (make docs)."""
        text = (ROOT / "README.md").read_text(encoding="utf-8")
        start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
        self.assertEqual(text[start:end], reference_table())
