"""The `pydio-ws` console script: token, publish, check-config.

`token` and `publish` find the private key exactly as the server does (config key,
key_file, PYDIO_WS_PRIVATE_KEY, or the generated key file), never from the command line.
"""

import argparse
import json
import ssl
import sys
import time
from datetime import datetime, timezone
import urllib.error
import urllib.request
from typing import List, Optional

from pydio_ws.auth import make_token
from pydio_ws.config import ConfigError, load_config
from pydio_ws.keys import resolve_private_key

DEFAULT_TTL = 3600
PUBLISH_TIMEOUT = 10


def _repo_right(text: str):
    repo_id, _, acl = text.partition(":")
    if not repo_id:
        raise argparse.ArgumentTypeError(f"expected ID[:ACL], got {text!r}")
    return repo_id, acl or "r"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pydio-ws", description="pydio-ws tools")
    commands = parser.add_subparsers(dest="command", required=True)

    token = commands.add_parser("token", help="print a browser token (JWT) signed with the key")
    token.add_argument("--user", required=True)
    token.add_argument("--group")
    token.add_argument("--repo", action="append", type=_repo_right, required=True,
                       metavar="ID[:ACL]", help="workspace and acl (default r); repeatable")
    token.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="seconds of validity")
    token.add_argument("--config")

    publish = commands.add_parser("publish", help="post a message to the private endpoint")
    publish.add_argument("--repo", required=True)
    publish.add_argument("--content", required=True)
    publish.add_argument("--user")
    publish.add_argument("--group")
    publish.add_argument("--config")
    publish.add_argument("--ca-file", help="CA bundle to verify an https private endpoint")

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "token":
            return _token(args)
        if args.command == "publish":
            return _publish(args)
        return _check_config(args)
    except ConfigError as error:
        print(f"pydio-ws: {error}", file=sys.stderr)
        return 2


def _token(args) -> int:
    key = resolve_private_key(load_config(args.config)).value
    print(make_token(key, args.user, dict(args.repo), time.time() + args.ttl, args.group))
    return 0


def _check_config(args) -> int:
    from pydio_ws.service import preflight

    config = load_config(args.file, environ={})
    for line in preflight(config, datetime.now(timezone.utc)):
        print(line)
    print(f"{args.file}: OK ({'one shared listener' if config.shared_listener else 'two listeners'})")
    return 0


def _publish(args) -> int:
    config = load_config(args.config)
    key = resolve_private_key(config, create=False).value
    message = {"REPO_ID": args.repo, "CONTENT": args.content}
    if args.user:
        message["USER_ID"] = args.user
    if args.group:
        message["GROUP_PATH"] = args.group
    request = urllib.request.Request(
        private_url(config), data=json.dumps(message).encode("utf-8"), method="POST",
        headers={"Content-Type": "application/json", "X-Pydio-Key": key})
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    try:
        with urllib.request.urlopen(request, timeout=PUBLISH_TIMEOUT, context=context) as response:
            print(response.read().decode("utf-8", "replace").strip())
            return 0
    except urllib.error.HTTPError as error:
        print(f"pydio-ws: {error.code} {error.read().decode('utf-8', 'replace').strip()}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as error:
        print(f"pydio-ws: cannot reach {private_url(config)}: {getattr(error, 'reason', error)}",
              file=sys.stderr)
    return 1


def private_url(config) -> str:
    """The URL of the private publish endpoint as configured (https when it uses TLS)."""
    host = config.private.host
    if ":" in host:
        host = f"[{host}]"
    secure = config.public.ssl if config.shared_listener else config.private.ssl
    return f"{'https' if secure else 'http'}://{host}:{config.private.port}{config.private.path}"


if __name__ == "__main__":
    sys.exit(main())
