"""`laasd token create|revoke|list`: manage the API tokens in the token file.

Layer: composition (command line). The token is printed once, on creation; the file keeps only its
hash. The file is `tokens_file`, else $CREDENTIALS_DIRECTORY/laas.tokens, else <home>/tokens; for the
packaged service, write /etc/credstore/laas.tokens (`--file`) and restart the service (systemd copies
credentials at start). A running daemon rereads its own token file when it changes, and turns token
checks on when <home>/tokens first appears.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from laas.daemon import tokens
from laas.daemon.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="create, revoke or list API tokens")
    token.add_argument("--file", type=Path, help="the token file (default: tokens_file, else HOME/tokens)")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a token and print it (once)")
    create.add_argument("name", help="who or what the token is for (one word)")
    create.add_argument("--scopes", default="generate,models:read",
                        help=f"comma-separated, among {', '.join(tokens.SCOPES)} (default generate,models:read; "
                        "add offload to let this client's requests leave the device)")
    create.add_argument("--local-only", action="store_true", help="this token's requests never leave the device")
    revoke = actions.add_parser("revoke", help="revoke the tokens with this id or name")
    revoke.add_argument("id_or_name")
    actions.add_parser("list", help="list the tokens (ids, names, scopes; never the tokens)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    path: Path = args.file or (Path(settings.tokens_file).expanduser() if settings.tokens_file
                               else settings.home / "tokens")
    try:
        if args.action == "create":
            scopes = frozenset(s.strip() for s in args.scopes.split(",") if s.strip())
            token, entry = tokens.create(path, args.name, scopes, args.local_only)
            print(token)
            print(f"token {entry.id} ({entry.name}) added to {path}; scopes {','.join(sorted(entry.scopes)) or '-'}"
                  f"{'; local-only' if entry.local_only else ''}. It is shown only now. A running laasd that reads "
                  f"this file uses it at once (the first token turns token checks on: every call then needs one); "
                  f"a systemd credential (LoadCredential=) is copied at start: restart the service.", file=sys.stderr)
        elif args.action == "revoke":
            gone = tokens.revoke(path, args.id_or_name)
            if not gone:
                print(f"laasd: no token {args.id_or_name!r} in {path}", file=sys.stderr)
                return 1
            print(f"revoked {', '.join(f'{e.id} ({e.name})' for e in gone)}", file=sys.stderr)
        else:
            for e in tokens.listed(path):
                flags = "\tlocal-only" if e.local_only else ""
                print(f"{e.id}\t{e.name}\t{','.join(sorted(e.scopes)) or '-'}{flags}")
    except tokens.TokenFileError as e:
        print(f"laasd: {e}", file=sys.stderr)
        return 2
    return 0
