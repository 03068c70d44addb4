"""API keys: hashed at rest, each bound to a tenant; a request's key comes in ``Authorization: Bearer KEY`` or
``X-API-Key: KEY``.

Stored forms (``mmrag api-key`` prints a new key and its line): ``sha256:<hex>`` (fine for the long random keys
``mmrag api-key`` makes) or ``scrypt:<n>:<r>:<p>:<salt hex>:<hash hex>`` (for keys people chose themselves).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
from dataclasses import dataclass

from mmrag.config import ApiKeySpec, Settings
from mmrag.errors import ConfigError

KEY_PREFIX = "mmrag_"


def new_key() -> str:
    """A new random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str, scheme: str = "sha256") -> str:
    if scheme == "sha256":
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    if scheme == "scrypt":
        n, r, p = 2**14, 8, 1
        salt = secrets.token_bytes(16)
        digest = hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
        return f"scrypt:{n}:{r}:{p}:{salt.hex()}:{digest.hex()}"
    raise ConfigError(f"unknown key hash scheme {scheme!r}: use sha256 or scrypt")


def verify_key(key: str, stored: str) -> bool:
    scheme, _, rest = stored.partition(":")
    if scheme == "sha256":
        return hmac.compare_digest(hashlib.sha256(key.encode()).hexdigest(), rest.lower())
    if scheme == "scrypt":
        try:
            n, r, p, salt, digest = rest.split(":")
            computed = hashlib.scrypt(key.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                                      dklen=len(bytes.fromhex(digest)))
        except ValueError:
            return False
        return hmac.compare_digest(computed.hex(), digest.lower())
    return False


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_name: str | None = None


class Authenticator:
    """Finds the tenant of a presented key. Verified keys are remembered by their sha256 so a slow scrypt check
    runs once per key and process, not per request."""

    def __init__(self, settings: Settings) -> None:
        self.keys: list[ApiKeySpec] = list(settings.api.keys)
        configured = settings.api.auth
        self.enabled = bool(self.keys) if configured is None else configured
        if self.enabled and not self.keys:
            raise ConfigError("api.auth is on but no API keys are configured: run `mmrag api-key --tenant NAME` and "
                              "add the printed hash under [api] keys, or serve on 127.0.0.1 with api.auth = false")
        self.default_tenant = settings.tenant
        self._known: dict[str, Principal] = {}
        self._lock = threading.Lock()

    def authenticate(self, key: str) -> Principal | None:
        fingerprint = hashlib.sha256(key.encode()).hexdigest()
        with self._lock:
            if fingerprint in self._known:
                return self._known[fingerprint]
        found: Principal | None = None
        for spec in self.keys:  # every key is checked, so timing says nothing about which one matched
            if verify_key(key, spec.hash) and found is None:
                found = Principal(spec.tenant, spec.name)
        if found is not None:
            with self._lock:
                self._known[fingerprint] = found
        return found
