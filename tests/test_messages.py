"""Tests for pydio_ws.messages: publish bodies (JSON and PHP serialize) into Messages."""

import json

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial import unittest

from pydio_ws import phpserialize
from pydio_ws.errors import DecodeError
from pydio_ws.messages import ALL_REPOS, Message, decode_body, decode_json

PHP_MESSAGE = b'a:2:{s:7:"REPO_ID";s:1:"1";s:7:"CONTENT";s:7:"<tree/>";}'


def as_json(document) -> bytes:
    return json.dumps(document).encode("utf-8")


class DecodeJsonTests(unittest.TestCase):
    """decode_json: one object or an array of objects."""

    def assertRefused(self, body: bytes, reason: str):
        with self.assertRaises(DecodeError) as caught:
            decode_json(body)
        self.assertEqual(caught.exception.reason, reason)

    def test_object(self):
        """A JSON object with every field decodes into one Message."""
        body = as_json({"REPO_ID": "1", "CONTENT": "<tree/>", "USER_ID": "alice",
                        "GROUP_PATH": "/sales", "NODE_PATHES": ["/a", "/b"]})
        self.assertEqual(decode_json(body),
                         [Message("1", "<tree/>", "alice", "/sales", ("/a", "/b"))])

    def test_array(self):
        """A JSON array of objects decodes into Messages in order."""
        body = as_json([{"REPO_ID": "1", "CONTENT": "a"}, {"REPO_ID": "2", "CONTENT": "b"}])
        self.assertEqual(decode_json(body), [Message("1", "a"), Message("2", "b")])

    def test_empty_array_is_refused(self):
        """An empty array is refused as "empty batch"."""
        self.assertRefused(b"[]", "empty batch")

    def test_bad_item_refuses_whole_batch_naming_it(self):
        """One bad item refuses the batch with a reason naming its index."""
        self.assertRefused(as_json([{"REPO_ID": "1", "CONTENT": "a"}, {"REPO_ID": "2"}]),
                           "item 1: CONTENT is missing")

    def test_non_object_item_is_refused(self):
        """An array item that is not an object is refused naming the item."""
        self.assertRefused(b'[{"REPO_ID": "1", "CONTENT": "a"}, "x"]', "item 1: message must be an object")

    def test_scalar_document_is_refused(self):
        """A JSON scalar is refused as "message must be an object"."""
        self.assertRefused(b"42", "message must be an object")

    def test_integer_repo_id_becomes_string(self):
        """An integer REPO_ID is accepted as its decimal string."""
        self.assertEqual(decode_json(b'{"REPO_ID": 3, "CONTENT": "a"}')[0].repo_id, "3")

    def test_bool_repo_id_is_refused(self):
        """A boolean REPO_ID is refused, not taken as 0 or 1."""
        self.assertRefused(b'{"REPO_ID": true, "CONTENT": "a"}', "REPO_ID must be a non-empty string")

    def test_missing_and_empty_repo_id_are_refused(self):
        """A missing REPO_ID and an empty one are refused with their own reasons."""
        self.assertRefused(b'{"CONTENT": "a"}', "REPO_ID is missing")
        self.assertRefused(b'{"REPO_ID": "", "CONTENT": "a"}', "REPO_ID must be a non-empty string")

    def test_all_workspace_aliases_normalize(self):
        """AJXP_REPO_SCOPE_ALL and "*" both become "*"."""
        messages = decode_json(as_json([{"REPO_ID": "AJXP_REPO_SCOPE_ALL", "CONTENT": "a"},
                                        {"REPO_ID": "*", "CONTENT": "b"}]))
        self.assertEqual([m.repo_id for m in messages], [ALL_REPOS, ALL_REPOS])
        self.assertTrue(all(m.for_all_repos for m in messages))

    def test_content_must_be_a_string(self):
        """A non-string CONTENT is refused."""
        self.assertRefused(b'{"REPO_ID": "1", "CONTENT": 5}', "CONTENT must be a string")

    def test_optional_fields_must_be_strings(self):
        """A non-string USER_ID or GROUP_PATH is refused naming the field."""
        self.assertRefused(b'{"REPO_ID": "1", "CONTENT": "a", "USER_ID": 5}', "USER_ID must be a string")
        self.assertRefused(b'{"REPO_ID": "1", "CONTENT": "a", "GROUP_PATH": []}',
                           "GROUP_PATH must be a string")

    def test_empty_optional_fields_mean_any(self):
        """Empty or null USER_ID and GROUP_PATH mean no restriction."""
        message = decode_json(b'{"REPO_ID": "1", "CONTENT": "a", "USER_ID": "", "GROUP_PATH": null}')[0]
        self.assertEqual((message.user_id, message.group_path), (None, None))

    def test_node_pathes_list_is_kept(self):
        """NODE_PATHES is kept as a tuple of strings; a non-list is refused."""
        message = decode_json(b'{"REPO_ID": "1", "CONTENT": "a", "NODE_PATHES": ["/x", "/y"]}')[0]
        self.assertEqual(message.node_paths, ("/x", "/y"))
        self.assertRefused(b'{"REPO_ID": "1", "CONTENT": "a", "NODE_PATHES": "/x"}',
                           "NODE_PATHES must be a list of strings")
        self.assertRefused(b'{"REPO_ID": "1", "CONTENT": "a", "NODE_PATHES": [1]}',
                           "NODE_PATHES must be a list of strings")

    def test_invalid_utf8_reason(self):
        """Bytes that are not UTF-8 are refused naming the offending byte offset."""
        self.assertRefused(b'{"REPO_ID": "\xff", "CONTENT": "a"}', "body is not UTF-8 (byte 13)")

    def test_invalid_json_reason(self):
        """Malformed JSON is refused with the parser's message and position."""
        self.assertRefused(b'{"REPO_ID": "1",}',
                           "invalid JSON: Expecting property name enclosed in double quotes "
                           "at line 1 column 17")

    def test_deeply_nested_json_is_a_decode_error(self):
        """JSON nested deeper than the parser's recursion limit is a DecodeError, not a crash."""
        with self.assertRaises(DecodeError):
            decode_json(b"[" * 100000)

    def test_oversized_integer_is_a_decode_error(self):
        """A JSON integer beyond Python's digit limit is a DecodeError, not a bare ValueError."""
        with self.assertRaises(DecodeError):
            decode_json(b'{"REPO_ID": ' + b"1" * 5000 + b', "CONTENT": "a"}')


class DecodeBodyTests(unittest.TestCase):
    """decode_body chooses the decoder by Content-Type, else by the body's start."""

    def test_php_body_decodes(self):
        """The PHP serialize() of a Pydio message decodes."""
        self.assertEqual(decode_body(PHP_MESSAGE), [Message("1", "<tree/>")])

    def test_php_batch_decodes_in_order(self):
        """A PHP list of message arrays decodes into a batch in key order."""
        body = phpserialize.dumps([{"REPO_ID": "1", "CONTENT": "a"}, {"REPO_ID": 2, "CONTENT": "b"}])
        self.assertEqual(decode_body(body), [Message("1", "a"), Message("2", "b")])

    def test_php_node_pathes_array_becomes_list(self):
        """A PHP NODE_PATHES array keyed 0..n becomes the list of its values in key order."""
        body = (b'a:3:{s:7:"REPO_ID";i:4;s:7:"CONTENT";s:1:"x";'
                b's:11:"NODE_PATHES";a:2:{i:1;s:2:"/b";i:0;s:2:"/a";}}')
        self.assertEqual(decode_body(body), [Message("4", "x", node_paths=("/a", "/b"))])

    def test_php_node_pathes_with_mixed_keys_is_a_decode_error(self):
        """A PHP NODE_PATHES array with both integer and string keys is a DecodeError, not a crash."""
        body = (b'a:3:{s:7:"REPO_ID";s:1:"1";s:7:"CONTENT";s:1:"x";'
                b's:11:"NODE_PATHES";a:2:{i:0;s:2:"/a";s:1:"k";s:2:"/b";}}')
        with self.assertRaises(DecodeError):
            decode_body(body)

    def test_php_object_is_refused(self):
        """A PHP object in the body is refused."""
        with self.assertRaises(DecodeError):
            decode_body(b'O:8:"stdClass":0:{}', "application/vnd.php.serialized")

    def test_json_content_type_with_parameters(self):
        """application/json; charset=utf-8 selects the JSON decoder."""
        body = b'  {"REPO_ID": "1", "CONTENT": "a"}'
        self.assertEqual(decode_body(body, "Application/JSON; charset=utf-8"), [Message("1", "a")])

    def test_content_type_wins_over_sniffing(self):
        """A PHP body sent as application/json is refused as invalid JSON."""
        with self.assertRaises(DecodeError) as caught:
            decode_body(PHP_MESSAGE, "application/json")
        self.assertTrue(caught.exception.reason.startswith("invalid JSON"))

    def test_php_content_types(self):
        """Each PHP serialized media type selects the PHP decoder."""
        for media_type in ("application/vnd.php.serialized", "application/x-php-serialized",
                           "text/x-php-serialized"):
            self.assertEqual(decode_body(PHP_MESSAGE, media_type), [Message("1", "<tree/>")])

    def test_sniffing_without_known_content_type(self):
        """With another Content-Type, "{"/"[" mean JSON and "a:" means PHP."""
        for body in (b'{"REPO_ID": "1", "CONTENT": "<tree/>"}',
                     b'\n[{"REPO_ID": "1", "CONTENT": "<tree/>"}]', PHP_MESSAGE):
            self.assertEqual(decode_body(body, "application/x-www-form-urlencoded"),
                             [Message("1", "<tree/>")])

    def test_empty_body(self):
        """An empty or blank body is refused as "empty body"."""
        for body in (b"", b"  \r\n"):
            with self.assertRaises(DecodeError) as caught:
                decode_body(body)
            self.assertEqual(caught.exception.reason, "empty body")

    def test_unknown_format(self):
        """A body that is neither JSON nor PHP is refused saying so."""
        with self.assertRaises(DecodeError) as caught:
            decode_body(b"REPO_ID=1&CONTENT=x")
        self.assertEqual(caught.exception.reason,
                         "body is neither a JSON object/array nor a PHP serialized array")


FIELD_NAMES = st.sampled_from(["REPO_ID", "CONTENT", "USER_ID", "GROUP_PATH", "NODE_PATHES"])
SCALARS = st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63 - 1) | st.text(max_size=5)
JSON_VALUES = st.recursive(
    SCALARS | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(FIELD_NAMES | st.text(max_size=3), children, max_size=5),
    max_leaves=12)
PHP_VALUES = st.recursive(
    SCALARS,
    lambda children: st.dictionaries(FIELD_NAMES | st.text(max_size=3) | st.integers(0, 3), children,
                                     max_size=5),
    max_leaves=12)
PHP_MESSAGES = st.fixed_dictionaries(
    {"REPO_ID": st.text(min_size=1, max_size=3) | st.integers(0, 9), "CONTENT": st.text(max_size=5)},
    optional={"USER_ID": PHP_VALUES, "GROUP_PATH": PHP_VALUES, "NODE_PATHES": PHP_VALUES})
CONTENT_TYPES = st.sampled_from(["", "application/json", "application/vnd.php.serialized",
                                 "text/plain"]) | st.text(max_size=20)


class DecodeBodyPropertyTests(unittest.TestCase):
    """decode_body returns Messages or raises DecodeError, whatever it is given."""

    def check(self, body: bytes, content_type: str):
        try:
            messages = decode_body(body, content_type)
        except DecodeError as error:
            self.assertIsInstance(error.reason, str)
            return
        self.assertTrue(messages)
        self.assertTrue(all(isinstance(m, Message) and m.repo_id and isinstance(m.content, str)
                            for m in messages))

    @given(st.binary(), CONTENT_TYPES)
    def test_arbitrary_bytes(self, body, content_type):
        """Arbitrary bytes give Messages or DecodeError, nothing else."""
        self.check(body, content_type)

    @given(JSON_VALUES, CONTENT_TYPES)
    def test_arbitrary_json_documents(self, document, content_type):
        """Any JSON document gives Messages or DecodeError, nothing else."""
        self.check(as_json(document), content_type)

    @given(PHP_VALUES | PHP_MESSAGES | st.lists(PHP_MESSAGES, max_size=3), CONTENT_TYPES)
    @example({"REPO_ID": "1", "CONTENT": "x", "NODE_PATHES": {0: "/a", "k": "/b"}}, "")
    def test_arbitrary_php_documents(self, document, content_type):
        """Any PHP serialize() document gives Messages or DecodeError, nothing else."""
        self.check(phpserialize.dumps(document), content_type)
