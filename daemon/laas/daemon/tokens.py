"""API tokens: created, stored hashed, checked in constant time, each with scopes.

Layer: domain + storage. A token reads `laas_<id>_<secret>`; the token file keeps one line per token,
`<id> <name> <scopes> <sha256 of the token> [local_only]`, never the token itself, so a copy of the file
lets nobody in (still, a file others can read draws a warning in the log, and one others can write,
which would let them add tokens, is refused). The secret is 256 random bits, so a plain SHA-256 suffices
(no password stretching is needed for keys nobody chose); the digests are compared with
hmac.compare_digest. The file is reread when it changes, so a revoked token stops working at once,
without a restart; the default file (<home>/tokens, `optional`) turns token checks on as soon as it
appears, so a first `laasd token create` beside a running daemon protects it at once.

Scopes: `generate` (Generate, Chat, Tokenize, ExplainRoute), `models:read` (ListModels, GetModel,
GetStats, the /metrics endpoint), `models:admin` (LoadModel, UnloadModel), `offload` (this client's
requests may leave the device: without it every request is local-only). Health needs no token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from laas.core.errors import InvalidArgument

log = logging.getLogger(__name__)

SCOPES = ("generate", "models:read", "models:admin", "offload")
_PREFIX = "laas_"


class TokenFileError(InvalidArgument):
    """The token file cannot be read or has a malformed line."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's id and name, or a client certificate's subject, with what it may do."""

    id: str
    name: str
    scopes: frozenset[str] = field(default_factory=lambda: frozenset(SCOPES))
    local_only: bool = False


ANONYMOUS = Principal("-", "anonymous")  # no token file: loopback and unix socket callers may do everything


@dataclass(frozen=True, slots=True)
class TokenEntry:
    id: str
    name: str
    scopes: frozenset[str]
    digest: str
    local_only: bool = False

    def line(self) -> str:
        return " ".join([self.id, self.name, ",".join(sorted(self.scopes)) or "-", self.digest,
                         *(["local_only"] if self.local_only else [])])

    @property
    def principal(self) -> Principal:
        return Principal(self.id, self.name, self.scopes, self.local_only)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def parse(text: str, where: str = "tokens") -> list[TokenEntry]:
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        scopes = frozenset() if len(parts) < 3 or parts[2] == "-" else frozenset(parts[2].split(","))
        if len(parts) not in (4, 5) or not scopes <= set(SCOPES) or len(parts[3]) != 64 or \
                (len(parts) == 5 and parts[4] != "local_only"):
            raise TokenFileError(f"{where}:{number}: expected `<id> <name> <scopes> <sha256> [local_only]` "
                                 f"with scopes among {', '.join(SCOPES)}", field="tokens_file")
        entries.append(TokenEntry(parts[0], parts[1], scopes, parts[3], len(parts) == 5))
    return entries


def check_mode(path: Path, mode: int) -> None:
    """Refuses a token file others may write (they could add tokens); warns when others may read it."""
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TokenFileError(f"the token file {path} is writable by group or others (mode {stat.S_IMODE(mode):o}): "
                             f"anyone could add a token; run chmod 600 {path}", field="tokens_file")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("the token file %s is readable by group or others (mode %o); run chmod 600 %s",
                    path, stat.S_IMODE(mode), path)


class TokenStore:
    """The token file, reread when its modification time, size or mode changes. An `optional` file that
    does not exist yet means no token checks (in_force is False) until it appears; once seen, it is
    required (a file that goes missing fails closed)."""

    def __init__(self, path: Path, optional: bool = False) -> None:
        self.path = path
        self._required = not optional
        self._stamp: tuple[int, int, int] | None = None
        self._by_id: dict[str, TokenEntry] = {}
        self.refresh()

    def in_force(self) -> bool:
        """Whether calls need a token: the file is required, or an optional one has appeared."""
        if not self._required and self.path.exists():
            self._required = True
            log.warning("the token file %s appeared: every call needs a token from now on", self.path)
        return self._required

    def refresh(self) -> None:
        if not self.in_force():
            return
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_mode)
            if stamp != self._stamp:
                check_mode(self.path, st.st_mode)
                self._by_id = {e.id: e for e in parse(self.path.read_text(encoding="utf-8"), str(self.path))}
                self._stamp = stamp
        except OSError as e:
            raise TokenFileError(f"cannot read the token file {self.path}: {e.strerror}", field="tokens_file") from e

    def authenticate(self, presented: str) -> Principal | None:
        """The principal of a presented token, or None; the digest comparison takes constant time."""
        self.refresh()
        token_id = presented[len(_PREFIX):].split("_", 1)[0] if presented.startswith(_PREFIX) else ""
        entry = self._by_id.get(token_id)
        expected = entry.digest if entry is not None else "0" * 64
        ok = hmac.compare_digest(_digest(presented), expected)
        return entry.principal if ok and entry is not None else None


def create(path: Path, name: str, scopes: frozenset[str], local_only: bool = False) -> tuple[str, TokenEntry]:
    """Adds a token to the file (created mode 0600); returns the token, shown once, and its entry."""
    if not name or any(c.isspace() for c in name):
        raise TokenFileError("a token name is one word", field="name")
    if not scopes <= set(SCOPES):
        raise TokenFileError(f"unknown scope(s) {sorted(scopes - set(SCOPES))}; known: {', '.join(SCOPES)}",
                             field="scopes")
    existing = parse(path.read_text(encoding="utf-8"), str(path)) if path.exists() else []
    token_id = secrets.token_hex(4)
    while any(e.id == token_id for e in existing):
        token_id = secrets.token_hex(4)
    token = f"{_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    entry = TokenEntry(token_id, name, scopes, _digest(token), local_only)
    _write(path, [*existing, entry])
    return token, entry


def revoke(path: Path, id_or_name: str) -> list[TokenEntry]:
    """Removes the tokens with this id or name; returns them."""
    entries = parse(path.read_text(encoding="utf-8"), str(path)) if path.exists() else []
    gone = [e for e in entries if id_or_name in (e.id, e.name)]
    _write(path, [e for e in entries if e not in gone])
    return gone


def listed(path: Path) -> list[TokenEntry]:
    return parse(path.read_text(encoding="utf-8"), str(path)) if path.exists() else []


def _write(path: Path, entries: list[TokenEntry]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# laas tokens: <id> <name> <scopes> <sha256 of the token> [local_only]\n")
        f.writelines(e.line() + "\n" for e in entries)
    os.replace(tmp, path)
