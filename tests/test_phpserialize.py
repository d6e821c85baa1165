"""Tests for pydio_ws.phpserialize: the strict PHP serialize() decoder and its encoder."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from pydio_ws.errors import DecodeError
from pydio_ws.phpserialize import MAX_DEPTH, dumps, loads

# No example database: the tests must leave no files behind.
fuzz = settings(database=None, max_examples=300)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SCALARS = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | st.text()
KEYS = INT64 | st.text()
DOCUMENTS = st.recursive(SCALARS, lambda children: st.dictionaries(KEYS, children, max_size=4), max_leaves=20)
TOKENS = st.sampled_from(
    [b"a:", b"s:", b"i:", b"d:", b"b:", b"N;", b"O:", b"r:", b"1", b"0", b"9" * 30, b"-", b".", b"E",
     b":", b";", b"{", b"}", b'"', b"\xc3", b"\xff", b"INF"]
)

ALICE = (
    b'a:3:{s:7:"REPO_ID";s:1:"1";s:7:"CONTENT";s:27:"<tree><reload_node/></tree>";'
    b's:7:"USER_ID";s:5:"alice";}'
)
RESUME = "/Été/résumé.txt"


class LoadsTests(unittest.TestCase):
    """What `loads` accepts and how it decodes it."""

    def test_decodes_pydio_message_in_key_order(self):
        """A serialized Pydio message decodes to a dict whose keys keep the PHP order."""
        document = loads(ALICE)
        self.assertEqual(list(document), ["REPO_ID", "CONTENT", "USER_ID"])
        self.assertEqual(
            document, {"REPO_ID": "1", "CONTENT": "<tree><reload_node/></tree>", "USER_ID": "alice"}
        )

    def test_string_length_counts_utf8_bytes(self):
        """LEN is the UTF-8 byte length: 19 bytes for the 15 characters of an accented path."""
        self.assertEqual(len(RESUME), 15)
        self.assertEqual(loads('s:19:"/Été/résumé.txt";'.encode()), RESUME)

    def test_string_length_in_characters_is_refused(self):
        """A LEN counting characters instead of bytes stops short of the closing quote."""
        with self.assertRaises(DecodeError) as caught:
            loads('s:15:"/Été/résumé.txt";'.encode())
        self.assertEqual(caught.exception.reason, "PHP serialize: expected '\"' at byte 21")

    def test_mislabelled_length_of_example_is_refused(self):
        """The 27-byte CONTENT declared as s:25 is refused where byte 25 is not a quote."""
        with self.assertRaises(DecodeError) as caught:
            loads(ALICE.replace(b"s:27:", b"s:25:"))
        self.assertEqual(caught.exception.reason, "PHP serialize: expected '\"' at byte 72")

    def test_string_may_contain_quotes_semicolons_and_braces(self):
        """Only LEN ends a string, so `";s:3:"`, `}` and `;` inside it are plain content."""
        document = loads(b'a:1:{s:1:"k";s:12:"x";s:3:"y";}";}')
        self.assertEqual(document, {"k": 'x";s:3:"y";}'})

    def test_integer_repo_id(self):
        """REPO_ID sent as a PHP integer decodes to a Python int."""
        document = loads(b'a:2:{s:7:"REPO_ID";i:2;s:7:"CONTENT";s:13:"<tree></tree>";}')
        self.assertEqual(document, {"REPO_ID": 2, "CONTENT": "<tree></tree>"})

    def test_nested_node_pathes(self):
        """A NODE_PATHES list nested in the message decodes to an int-keyed dict."""
        document = loads(
            'a:3:{s:7:"REPO_ID";s:1:"1";s:7:"CONTENT";s:7:"<tree/>";'
            's:11:"NODE_PATHES";a:2:{i:0;s:19:"/Été/résumé.txt";i:1;s:2:"/a";}}'.encode()
        )
        self.assertEqual(document["NODE_PATHES"], {0: RESUME, 1: "/a"})

    def test_decodes_scalars(self):
        """Null, booleans, integers and PHP's float spellings decode to Python scalars."""
        cases = {
            b"N;": None,
            b"b:0;": False,
            b"b:1;": True,
            b"i:-42;": -42,
            b"i:9223372036854775807;": 2**63 - 1,
            b"d:0.5;": 0.5,
            b"d:1.0E+25;": 1e25,
            b"d:-INF;": -math.inf,
            b"a:0:{}": {},
        }
        for data, expected in cases.items():
            self.assertEqual(loads(data), expected, data)
        self.assertTrue(math.isnan(loads(b"d:NAN;")))

    def test_accepts_maximum_depth(self):
        """Arrays nested exactly MAX_DEPTH deep decode."""
        data = b"a:1:{i:0;" * MAX_DEPTH + b"N;" + b"}" * MAX_DEPTH
        value = loads(data)
        for _ in range(MAX_DEPTH):
            value = value[0]
        self.assertIsNone(value)


class RefusalTests(unittest.TestCase):
    """Each malformed or unsafe input is refused with a precise reason."""

    def assertRefused(self, data: bytes, reason: str):
        with self.assertRaises(DecodeError) as caught:
            loads(data)
        self.assertEqual(caught.exception.reason, "PHP serialize: " + reason)

    def test_objects_are_refused(self):
        """`O:`, `C:` and enum `E:` values are refused wherever they appear."""
        self.assertRefused(b'O:8:"stdClass":0:{}', "objects are refused (O: at byte 0)")
        self.assertRefused(b'a:1:{i:0;C:3:"Foo":1:{x}}', "objects are refused (C: at byte 9)")
        self.assertRefused(b'E:7:"Foo:Bar";', "objects are refused (E: at byte 0)")

    def test_references_are_refused(self):
        """`r:` and `R:` back-references are refused."""
        self.assertRefused(b"a:2:{i:0;i:1;i:1;r:2;}", "references are refused (r: at byte 17)")
        self.assertRefused(b"a:2:{i:0;i:1;i:1;R:2;}", "references are refused (R: at byte 17)")

    def test_string_running_past_the_end_is_refused(self):
        """A LEN longer than the input is refused, naming where the input ends."""
        self.assertRefused(b's:19:"abc";', "string length 19 runs past the end at byte 11")

    def test_missing_semicolon_is_refused(self):
        """A value not followed by `;` is refused at that byte."""
        self.assertRefused(b's:3:"abc"}', "expected ';' at byte 9")
        self.assertRefused(b"i:12", "expected ';' at byte 4")

    def test_trailing_data_is_refused(self):
        """Bytes after the one top-level value are refused."""
        self.assertRefused(b"i:1;i:2;", "trailing data at byte 4")

    def test_invalid_utf8_is_refused(self):
        """A string that is not UTF-8 is refused at the first bad byte."""
        self.assertRefused(b's:3:"a\xc3(";', "invalid UTF-8 in string at byte 6")

    def test_impossible_array_count_is_refused(self):
        """A count the remaining bytes cannot hold is refused before any element is read."""
        self.assertRefused(b"a:99999999:{}", "array count 99999999 cannot fit in the remaining 1 bytes at byte 0")

    def test_short_array_is_refused(self):
        """An array closing before its declared count is refused."""
        self.assertRefused(b'a:2:{i:0;s:5:"abcde";}', "array ends after 1 of 2 elements at byte 21")

    def test_long_array_is_refused(self):
        """An array holding more pairs than its declared count is refused."""
        self.assertRefused(b"a:1:{i:0;N;i:1;N;}", "array has more than its 1 declared elements at byte 11")

    def test_duplicate_key_is_refused(self):
        """A key repeated in one array is refused."""
        self.assertRefused(b"a:2:{i:0;i:1;i:0;i:2;}", "duplicate array key at byte 13")

    def test_non_scalar_key_is_refused(self):
        """Keys other than `i:` and `s:` are refused."""
        self.assertRefused(b"a:1:{d:1;N;}", "array key must be an integer or a string at byte 5")

    def test_excessive_depth_is_refused(self):
        """An array nested one level past MAX_DEPTH is refused at its first byte."""
        depth = MAX_DEPTH + 1
        data = b"a:1:{i:0;" * depth + b"N;" + b"}" * depth
        self.assertRefused(data, f"arrays nested deeper than {MAX_DEPTH} at byte {9 * MAX_DEPTH}")

    def test_huge_nesting_is_refused_without_recursion(self):
        """A hundred thousand nested arrays end in DecodeError, not RecursionError."""
        self.assertRaises(DecodeError, loads, b"a:1:{i:0;" * 100_000)

    def test_out_of_range_integers_are_refused(self):
        """Integers outside signed 64 bits and absurdly long numbers are refused."""
        self.assertRefused(b"i:9223372036854775808;", "integer out of range at byte 2")
        self.assertRefused(b"i:" + b"9" * 5000 + b";", "number too long at byte 2")

    def test_unknown_type_and_empty_input_are_refused(self):
        """An unknown type letter, a control byte or no input at all is refused."""
        self.assertRefused(b"x:1;", "unknown type 'x' at byte 0")
        self.assertRefused(b"\x00", "unknown type 0x00 at byte 0")
        self.assertRefused(b"", "unexpected end of data at byte 0")

    @fuzz
    @given(st.binary())
    def test_garbage_raises_only_decode_error(self, data):
        """Arbitrary bytes either decode or raise DecodeError, never another exception."""
        try:
            loads(data)
        except DecodeError:
            pass

    @fuzz
    @given(st.lists(TOKENS).map(b"".join))
    def test_token_soup_raises_only_decode_error(self, data):
        """Shuffled serialize() tokens either decode or raise DecodeError."""
        try:
            loads(data)
        except DecodeError:
            pass

    @fuzz
    @given(DOCUMENTS, st.data())
    def test_truncation_is_refused(self, document, data):
        """Every strict prefix of a valid serialization is refused."""
        serialized = dumps(document)
        cut = data.draw(st.integers(min_value=0, max_value=len(serialized) - 1))
        self.assertRaises(DecodeError, loads, serialized[:cut])

    @fuzz
    @given(DOCUMENTS, st.data())
    def test_mutation_raises_only_decode_error(self, document, data):
        """A valid serialization with one byte replaced decodes or raises DecodeError."""
        serialized = bytearray(dumps(document))
        serialized[data.draw(st.integers(0, len(serialized) - 1))] = data.draw(st.integers(0, 255))
        try:
            loads(bytes(serialized))
        except DecodeError:
            pass


class DumpsTests(unittest.TestCase):
    """What `dumps` produces."""

    def test_encodes_pydio_message(self):
        """A message dict encodes to the exact bytes PHP serialize() gives."""
        document = {"REPO_ID": "1", "CONTENT": "<tree><reload_node/></tree>", "USER_ID": "alice"}
        self.assertEqual(dumps(document), ALICE)

    def test_lists_become_int_keyed_arrays(self):
        """Lists and tuples encode as arrays keyed 0..n-1 with UTF-8 byte lengths."""
        expected = 'a:2:{i:0;s:19:"/Été/résumé.txt";i:1;a:1:{i:0;b:0;}}'.encode()
        self.assertEqual(dumps([RESUME, (False,)]), expected)

    def test_encodes_special_floats(self):
        """Infinities and NaN use PHP's INF, -INF and NAN spellings."""
        self.assertEqual(dumps([math.inf, -math.inf, math.nan]), b"a:3:{i:0;d:INF;i:1;d:-INF;i:2;d:NAN;}")

    def test_refuses_unencodable_values(self):
        """Other types, bool keys, 65-bit integers and excessive nesting are refused."""
        self.assertRaises(TypeError, dumps, b"bytes")
        self.assertRaises(TypeError, dumps, {True: 1})
        self.assertRaises(ValueError, dumps, 2**63)
        nested: list = []
        for _ in range(MAX_DEPTH):
            nested = [nested]
        self.assertRaises(ValueError, dumps, nested)

    @fuzz
    @given(DOCUMENTS)
    def test_round_trip(self, document):
        """`loads(dumps(x)) == x`, and re-encoding gives the same bytes (order kept)."""
        serialized = dumps(document)
        self.assertEqual(loads(serialized), document)
        self.assertEqual(dumps(loads(serialized)), serialized)
