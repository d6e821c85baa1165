"""The Message value object and the decoders of private-side bodies.

A publisher sends one message or a batch, as JSON (an object or an array of objects) or
as PHP `serialize()` of an array (see `pydio_ws.phpserialize`). Fields:

    REPO_ID      workspace id (string; a PHP integer is accepted); "*" or
                 "AJXP_REPO_SCOPE_ALL" mean every workspace
    CONTENT      the text pushed to browsers, as is (string)
    USER_ID      only this user (optional string)
    GROUP_PATH   only connections with exactly this group path (optional string)
    NODE_PATHES  affected node paths (optional list of strings, kept)

Every decoder returns a list of Message or raises DecodeError with the precise reason;
a batch with one bad item is refused whole.
"""

import json
from dataclasses import dataclass
from typing import Optional, Tuple

from pydio_ws.errors import DecodeError
from pydio_ws import phpserialize

ALL_REPOS = "*"
_ALL_REPO_ALIASES = frozenset({ALL_REPOS, "AJXP_REPO_SCOPE_ALL"})


@dataclass(frozen=True)
class Message:
    """One event to push: `content` goes to connections matching the other fields."""

    repo_id: str
    content: str
    user_id: Optional[str] = None
    group_path: Optional[str] = None
    node_paths: Tuple[str, ...] = ()

    @property
    def for_all_repos(self) -> bool:
        """True when the message goes to every workspace."""
        return self.repo_id == ALL_REPOS


def _optional_string(fields: dict, name: str, where: str) -> Optional[str]:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError(f"{where}{name} must be a string")
    return value or None


def message_from_fields(fields, where: str = "") -> Message:
    """Validate one decoded mapping of fields into a Message.

    `where` prefixes the reason (e.g. "item 2: ") so a batch error names its item.
    """
    if not isinstance(fields, dict):
        raise DecodeError(f"{where}message must be an object")
    repo_id = fields.get("REPO_ID")
    if isinstance(repo_id, int) and not isinstance(repo_id, bool):
        repo_id = str(repo_id)
    if repo_id is None:
        raise DecodeError(f"{where}REPO_ID is missing")
    if not isinstance(repo_id, str) or not repo_id:
        raise DecodeError(f"{where}REPO_ID must be a non-empty string")
    content = fields.get("CONTENT")
    if content is None:
        raise DecodeError(f"{where}CONTENT is missing")
    if not isinstance(content, str):
        raise DecodeError(f"{where}CONTENT must be a string")
    node_paths = fields.get("NODE_PATHES") or ()
    if isinstance(node_paths, dict):
        # PHP serializes a list as an array with integer keys.
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in node_paths):
            raise DecodeError(f"{where}NODE_PATHES must be a list of strings")
        node_paths = [node_paths[k] for k in sorted(node_paths)]
    if not isinstance(node_paths, (list, tuple)) or not all(
        isinstance(p, str) for p in node_paths
    ):
        raise DecodeError(f"{where}NODE_PATHES must be a list of strings")
    return Message(
        repo_id=ALL_REPOS if repo_id in _ALL_REPO_ALIASES else repo_id,
        content=content,
        user_id=_optional_string(fields, "USER_ID", where),
        group_path=_optional_string(fields, "GROUP_PATH", where),
        node_paths=tuple(node_paths),
    )


def decode_json(body: bytes) -> list:
    """Decode a JSON object or array of objects into Messages."""
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DecodeError(f"body is not UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DecodeError(f"invalid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        raise DecodeError(f"invalid JSON: {error}") from None
    except RecursionError:
        raise DecodeError("invalid JSON: nested too deeply") from None
    return messages_from_document(document)


def messages_from_document(document) -> list:
    """Turn a decoded object, or list of objects, into Messages."""
    if isinstance(document, list):
        if not document:
            raise DecodeError("empty batch")
        return [message_from_fields(item, f"item {index}: ") for index, item in enumerate(document)]
    return [message_from_fields(document)]


JSON_TYPES = frozenset({"application/json", "text/json"})
PHP_TYPES = frozenset({"application/vnd.php.serialized", "application/x-php-serialized",
                       "text/x-php-serialized"})


def decode_php(body: bytes) -> list:
    """Decode the PHP serialize() of one message array (or a list of them)."""
    document = phpserialize.loads(body)
    if isinstance(document, dict) and document and all(isinstance(k, int) for k in document):
        document = [document[k] for k in sorted(document)]
    return messages_from_document(document)


def decode_body(body: bytes, content_type: str = "") -> list:
    """Decode a publish body as JSON or PHP serialize(), by Content-Type or by its start."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type in JSON_TYPES:
        return decode_json(body)
    if media_type in PHP_TYPES:
        return decode_php(body)
    start = body.lstrip()[:2]
    if start[:1] in (b"{", b"["):
        return decode_json(body)
    if start == b"a:":
        return decode_php(body)
    if not start:
        raise DecodeError("empty body")
    raise DecodeError("body is neither a JSON object/array nor a PHP serialized array")
