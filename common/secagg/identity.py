"""Long-term site identities for malicious-secure aggregation (Bonawitz et al. 2017,
section 6): Ed25519 keys from ``cryptography``, a roster of the sites' public keys,
and the two statements a site signs in a round.

A site signs its key advertisement, so a coordinator cannot substitute its own
public keys, and, after the masked uploads, the set of survivors together with the
hash of the model and instructions it received (the consistency check), so a
coordinator cannot give different sites different survivor lists or models.

A roster file holds one site per line, ``NAME BASE64-PUBLIC-KEY``; blank lines and
``#`` comments are ignored. ``fedgraft site-keys`` writes a site's key pair and its
roster line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

IDENTITY_BYTES = 32
SIGNATURE_BYTES = 64
_ADVERTISEMENT = b"fedgraft/secagg/advertisement/v1"
_CONSISTENCY = b"fedgraft/secagg/consistency/v1"


class IdentityError(ValueError):
    """A signing key or roster cannot be used; the message names the file."""


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: distinct tuples never give the same bytes."""
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def _node(node: int) -> bytes:
    return struct.pack(">Q", node & (2**64 - 1))


def advertisement_statement(
    salt: bytes, node: int, cipher_pk: bytes, mask_pk: bytes
) -> bytes:
    """What a site signs when it advertises its round keys."""
    return _frame(_ADVERTISEMENT, salt, _node(node), cipher_pk, mask_pk)


def consistency_statement(
    salt: bytes, node: int, survivors: Iterable[int], model_hash: bytes
) -> bytes:
    """What a site signs in the consistency check: the survivors it was told of and
    the hash of the model and instructions it trained on."""
    members = b"".join(_node(n) for n in sorted(survivors))
    return _frame(_CONSISTENCY, salt, _node(node), members, model_hash)


def model_digest(arrays: Mapping[str, bytes], config: Mapping[str, object]) -> bytes:
    """SHA-256 over a round's model (array name -> raw bytes) and its instructions.

    Every name and value is length-framed and the entries sorted, so two sites that
    received the same message get the same digest and any difference changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(_frame(b"array", name.encode(), arrays[name]))
    for name in sorted(config):
        digest.update(_frame(b"config", name.encode(), repr(config[name]).encode()))
    return digest.digest()


def public_raw(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key."""
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def verify(identity: bytes, signature: bytes, statement: bytes) -> bool:
    """True when ``signature`` is ``identity``'s Ed25519 signature of ``statement``."""
    if len(identity) != IDENTITY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(identity).verify(signature, statement)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """A site's Ed25519 private key from an unencrypted PEM file.

    Raises
    ------
    IdentityError
        Naming the file, when it is missing or not an Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise IdentityError(
            f"node config secagg-signing-key: cannot read {path}: {error}; make one "
            "with `fedgraft site-keys NAME --out DIR`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"node config secagg-signing-key: {path} is not an Ed25519 private key"
        )
    return key


@dataclass(frozen=True)
class Roster:
    """The sites' public keys a site trusts: identity (raw 32 bytes) -> site name."""

    names: Mapping[bytes, str]

    def __contains__(self, identity: object) -> bool:
        return identity in self.names

    def __len__(self) -> int:
        return len(self.names)

    def name(self, identity: bytes) -> str:
        """The roster name of ``identity`` (``?`` for a key not in the roster)."""
        return self.names.get(identity, "?")

    @classmethod
    def load(cls, path: Path) -> Roster:
        """Read a roster file (``NAME BASE64-KEY`` per line).

        Raises
        ------
        IdentityError
            Naming the file and line of a malformed or repeated entry.
        """
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise IdentityError(
                f"node config secagg-roster: cannot read {path}: {error}"
            ) from None
        names: dict[bytes, str] = {}
        for number, line in enumerate(lines, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            identity = _roster_entry(path, number, text)
            if identity[1] in names:
                raise IdentityError(
                    f"{path}:{number}: the key of {identity[0]!r} is already listed "
                    f"for {names[identity[1]]!r}"
                )
            names[identity[1]] = identity[0]
        if not names:
            raise IdentityError(f"{path}: the roster lists no site")
        return cls(names)


def _roster_entry(path: Path, number: int, text: str) -> tuple[str, bytes]:
    fields = text.split()
    try:
        if len(fields) != 2:
            raise ValueError("expected NAME BASE64-KEY")
        raw = base64.b64decode(fields[1], validate=True)
        Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error) as error:
        raise IdentityError(
            f"{path}:{number}: not a roster line ({error}); paste the line "
            "`fedgraft site-keys` printed"
        ) from None
    return fields[0], raw


def roster_line(name: str, key: Ed25519PrivateKey) -> str:
    """The roster line of a site: ``NAME BASE64-PUBLIC-KEY``."""
    return f"{name} {base64.b64encode(public_raw(key)).decode()}"


def write_site_keys(name: str, directory: Path) -> tuple[Path, Path]:
    """Write a fresh Ed25519 key pair: ``NAME.ed25519`` (PEM, mode 0600) and
    ``NAME.ed25519.pub`` (its roster line).

    Raises
    ------
    IdentityError
        When the name is not a plain word or the private key file already exists.
    """
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise IdentityError(f"site name {name!r}: use letters, digits, '-', '_', '.'")
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.ed25519", directory / f"{name}.ed25519.pub"
    if private.exists():
        raise IdentityError(f"{private} exists; refusing to overwrite a site's key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(pem)
    public.write_text(roster_line(name, key) + "\n")
    return private, public
