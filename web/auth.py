"""Who may use the web console: password hashes, the two users, failed-login limits.

- There is no default password. The admin's comes from ``CXR_WEB_ADMIN_PASSWORD`` or from
  the scrypt hash file ``CXR_WEB_ADMIN_PASSWORD_FILE`` that ``cxr run`` writes once (it
  prints the generated password once and keeps only the hash). With neither, ``cxr web``
  refuses to start (:class:`NoPasswordError` says how to set one).
- Users: ``admin`` (everything, including Retry) and, when ``CXR_WEB_VIEWER_PASSWORD``
  is set, ``viewer`` (read-only).
- Failed logins are counted per client address and user name; after
  ``CXR_WEB_LOGIN_MAX_FAILURES`` within ``CXR_WEB_LOGIN_WINDOW_SECONDS`` further attempts
  are refused (HTTP 429) until the window has passed. The log line names the client and
  the user name, never the password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import Settings

log = logging.getLogger(__name__)

ADMIN = "admin"
VIEWER = "viewer"
ROLES = {ADMIN: "admin", VIEWER: "viewer"}
# scrypt parameters (RFC 7914): 2^14 x 8 x 1, 64 MiB max memory: ~50 ms per check here
_N, _R, _P = 2**14, 8, 1


class NoPasswordError(RuntimeError):
    """No admin password is configured: the console must not start."""


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64), for the hash file."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=2**26)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.strip().split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=2**26,
            dklen=len(want),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def write_password_file(path: Path, password: str) -> None:
    """Write the hash (mode 0600, atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(hash_password(password) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_admin_password(settings: Settings) -> str | None:
    """For ``cxr run``: when no admin password is configured, generate one, store only its
    hash in ``CXR_WEB_ADMIN_PASSWORD_FILE`` and return it (the caller prints it once).
    None when a password or a hash file exists already."""
    if settings.web_admin_password is not None:
        return None
    path = Path(settings.web_admin_password_file)
    if path.is_file() and path.read_text().strip():
        return None
    password = secrets.token_urlsafe(15)
    write_password_file(path, password)
    return password


MIN_PASSWORD = 8


def check_credentials_config(settings: Settings) -> None:
    """Refuse a configuration whose logins could never work or are too weak: a password
    under MIN_PASSWORD characters, a hash file that is not an scrypt hash (a plain password
    written there by mistake), a session key under 32 characters."""
    if settings.web_admin_password is not None:
        if len(settings.web_admin_password.get_secret_value()) < MIN_PASSWORD:
            raise NoPasswordError(
                f"CXR_WEB_ADMIN_PASSWORD is shorter than {MIN_PASSWORD} characters"
            )
    else:
        path = Path(settings.web_admin_password_file)
        text = path.read_text().strip() if path.is_file() else ""
        if not text:
            raise NoPasswordError(HOW_TO_SET)
        if not text.startswith("scrypt$") or text.count("$") != 5:
            raise NoPasswordError(
                f"{path} (CXR_WEB_ADMIN_PASSWORD_FILE) holds no scrypt hash; write one with "
                "`cxr web --set-password` (never the password itself)"
            )
    vp = settings.web_viewer_password
    if vp is not None and vp.get_secret_value() and len(vp.get_secret_value()) < MIN_PASSWORD:
        raise NoPasswordError(f"CXR_WEB_VIEWER_PASSWORD is shorter than {MIN_PASSWORD} characters")
    sk = settings.web_secret_key
    if sk is not None and len(sk.get_secret_value()) < 32:
        raise NoPasswordError("CXR_WEB_SECRET_KEY must have at least 32 characters")


HOW_TO_SET = (
    "no admin password is set for the web console. Set CXR_WEB_ADMIN_PASSWORD, or "
    "write a hash with `cxr web --set-password` (stored in "
    "CXR_WEB_ADMIN_PASSWORD_FILE), or start it through `cxr run`, which generates one"
)


@dataclass(frozen=True)
class User:
    name: str
    role: str  # admin / viewer

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


class Credentials:
    """The configured users, each with a password check.

    scrypt costs ~60 ms per check on purpose; HTTP Basic sends the password with every
    request, so a *successful* check is remembered for ``CACHE_S`` under a keyed hash
    (HMAC with a per-process random key: the cache never holds the password). Failures are
    never cached, so guessing still pays the full cost (and the limiter counts it)."""

    CACHE_S = 300.0

    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = hashes
        self._key = os.urandom(32)
        self._ok: dict[bytes, tuple[float, User]] = {}
        self._lock = threading.Lock()

    def _cache_key(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()

    @classmethod
    def from_settings(cls, settings: Settings) -> Credentials:
        check_credentials_config(settings)
        hashes: dict[str, str] = {}
        if settings.web_admin_password is not None:
            pw = settings.web_admin_password.get_secret_value()
            if not pw:
                raise NoPasswordError("CXR_WEB_ADMIN_PASSWORD is empty. " + HOW_TO_SET)
            hashes[ADMIN] = hash_password(pw)
        else:
            path = Path(settings.web_admin_password_file)
            text = path.read_text().strip() if path.is_file() else ""
            if not text:
                raise NoPasswordError(HOW_TO_SET)
            hashes[ADMIN] = text
        if settings.web_viewer_password is not None:
            vp = settings.web_viewer_password.get_secret_value()
            if vp:
                hashes[VIEWER] = hash_password(vp)
        return cls(hashes)

    def fingerprint(self, user: str) -> str | None:
        """A short digest of the user's current password hash, kept in the session: a
        changed password or a removed user ends existing sessions. None: no such user."""
        encoded = self._hashes.get(user)
        if encoded is None:
            return None
        return hmac.new(self._key, encoded.encode(), hashlib.sha256).hexdigest()[:16]

    def check(self, user: str, password: str) -> User | None:
        key = self._cache_key(user, password)
        now = time.monotonic()
        with self._lock:
            hit = self._ok.get(key)
            if hit is not None and now - hit[0] < self.CACHE_S:
                return hit[1]
        encoded = self._hashes.get(user)
        if encoded is None:
            # same work as a real check, so timing does not tell which users exist
            verify_password(password, self._hashes[ADMIN])
            return None
        if not verify_password(password, encoded):
            return None
        found = User(user, ROLES[user])
        with self._lock:
            if len(self._ok) > 1000:
                self._ok.clear()
            self._ok[key] = (now, found)
        return found


class LoginLimiter:
    """Failed logins per (client, user name) in a sliding window, and per client over all
    user names (``CLIENT_FACTOR`` times as many), so rotating names does not get around it.
    Memory is bounded: expired entries are dropped when the table grows."""

    CLIENT_FACTOR = 4
    MAX_KEYS = 10_000

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._fails: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        for k in [k for k, q in self._fails.items() if not q or now - q[-1] > self.window_s]:
            del self._fails[k]
        while len(self._fails) > self.MAX_KEYS:  # still too many: forget the oldest
            oldest = min(self._fails, key=lambda k: self._fails[k][-1])
            del self._fails[oldest]

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and now - q[0] > self.window_s:
            q.popleft()
        return q

    def retry_after(self, client: str, user: str, now: float | None = None) -> float | None:
        """Seconds until another attempt is allowed, or None when it is allowed now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            waits = []
            q = self._recent((client, user[:64]), now)
            if len(q) >= self.max_failures:
                waits.append(self.window_s - (now - q[0]))
            c = self._recent((client, "\0any"), now)
            if len(c) >= self.max_failures * self.CLIENT_FACTOR:
                waits.append(self.window_s - (now - c[0]))
            return max(1.0, *waits) if waits else None

    def failed(self, client: str, user: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._recent((client, user[:64]), now).append(now)
            self._recent((client, "\0any"), now).append(now)
            if len(self._fails) > self.MAX_KEYS:  # bound the memory an attacker can make us use
                self._prune(now)
        log.warning("web login failed for user %r from %s", user[:64], client)

    def succeeded(self, client: str, user: str) -> None:
        with self._lock:
            self._fails.pop((client, user[:64]), None)
