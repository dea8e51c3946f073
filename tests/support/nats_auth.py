"""NATS credentials for the tests: NKey users, and an operator / account / user JWT chain
with the user's `.creds` file (nats-server's "operator mode", with a memory resolver)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

__all__ = ["NKey", "OperatorMode", "new_nkey", "operator_mode"]


@dataclass(frozen=True)
class NKey:
    seed: bytes  # S...
    public: str  # U... / A... / O...

    def sign(self, data: bytes) -> bytes:
        signed: bytes = nkeys.from_seed(bytearray(self.seed)).sign(data)
        return signed


def new_nkey(prefix: int) -> NKey:
    seed = bytes(nkeys.encode_seed(os.urandom(32), prefix))
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    return NKey(seed, public)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: NKey, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2): claims signed with the issuer's NKey (alg ed25519-nkey)."""
    claims: dict[str, Any] = {"jti": "", "iat": int(time.time()), "iss": issuer.public,
                              "name": name, "sub": subject, "nats": {**nats, "version": 2}}
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1, "mem_storage": -1,
              "disk_storage": -1, "streams": -1, "consumer": -1}


@dataclass(frozen=True)
class OperatorMode:
    config: str  # nats-server configuration lines
    creds: Path  # the user's .creds file


def operator_mode(directory: Path) -> OperatorMode:
    """An operator, an account with JetStream and a user of it; the user's `.creds`."""
    operator = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    system = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    account = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_nkey(nkeys.PREFIX_BYTE_USER)
    operator_jwt = _jwt(operator, operator.public, "test-operator", {"type": "operator"})
    system_jwt = _jwt(operator, system.public, "SYS", {"type": "account",
                                                       "limits": {**_UNLIMITED,
                                                                  "mem_storage": 0,
                                                                  "disk_storage": 0}})
    account_jwt = _jwt(operator, account.public, "kv", {"type": "account",
                                                        "limits": _UNLIMITED})
    user_jwt = _jwt(account, user.public, "indexer", {
        "type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    directory.mkdir(parents=True, exist_ok=True)
    creds = directory / "indexer.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n" + user_jwt + "\n------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n" + user.seed.decode()
        + "\n------END USER NKEY SEED------\n")
    creds.chmod(0o600)
    config = (f"operator: {operator_jwt}\nsystem_account: {system.public}\n"
              f"resolver: MEMORY\nresolver_preload: {{\n  {system.public}: {system_jwt}\n"
              f"  {account.public}: {account_jwt}\n}}")
    return OperatorMode(config, creds)
