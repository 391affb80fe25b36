"""API keys (stored as keyed hashes) and callback signatures (HMAC-SHA256)."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

KEY_PREFIX = "cnc"


@dataclass(frozen=True)
class NewKey:
    """A freshly minted key: ``token`` is shown once, only ``prefix`` and ``hash`` are kept."""

    token: str
    prefix: str
    hash: str


def hash_key(token: str, pepper: str) -> str:
    """Keyed hash of an API key. Keys carry 256 random bits, so a fast hash is enough;
    the server secret as HMAC key means a leaked table alone cannot be checked offline."""
    return hmac.new(pepper.encode(), token.encode(), hashlib.sha256).hexdigest()


def new_api_key(pepper: str) -> NewKey:
    prefix = secrets.token_hex(6)
    token = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(token=token, prefix=prefix, hash=hash_key(token, pepper))


def parse_prefix(token: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def verify_key(token: str, stored_hash: str, pepper: str) -> bool:
    return hmac.compare_digest(hash_key(token, pepper), stored_hash)


def new_callback_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


SIGNATURE_HEADER = "X-CNC-Signature"


def sign_payload(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """Signature header value ``t=<unix>,v1=<hex>`` over ``"<t>." + body``.

    The receiver recomputes HMAC-SHA256 with its tenant's callback secret and rejects
    stale timestamps, which stops replays."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify_signature(
    secret: str, body: bytes, header: str, tolerance_s: int = 300, now: int | None = None
) -> bool:
    """Check a signature header as a receiver would (used by tests and documented)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        ts = int(fields["t"])
    except (ValueError, KeyError):
        return False
    current = int(time.time()) if now is None else now
    if abs(current - ts) > tolerance_s:
        return False
    expected = sign_payload(secret, body, ts).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def host_allowed(url: str, allowed: list[str]) -> bool:
    """Whether ``url``'s host matches the allowlist (exact names or ``*.domain`` patterns)."""
    host = (urlsplit(url).hostname or "").lower()
    return bool(host) and any(fnmatch.fnmatchcase(host, pattern) for pattern in allowed)
