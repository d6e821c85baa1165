"""The browser's legacy text protocol: `register:<repoId>` and `unregister:`."""

from dataclasses import dataclass
from typing import Optional

REGISTER = "register"
UNREGISTER = "unregister"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Command:
    """A parsed browser command; `repo_id` is set for REGISTER only."""

    kind: str
    repo_id: Optional[str] = None


def parse_command(text: str) -> Command:
    """Parse one text frame: `register:<id>` (id non-empty), `unregister:<anything>`."""
    verb, colon, argument = text.partition(":")
    if colon and verb == REGISTER and argument:
        return Command(REGISTER, argument)
    if colon and verb == UNREGISTER:
        return Command(UNREGISTER)
    return Command(UNKNOWN)
