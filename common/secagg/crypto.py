"""Cryptographic building blocks of secure aggregation, all from ``cryptography``:
X25519 key agreement, HKDF-SHA256 key derivation, AES-256-GCM for shares in transit,
and t-of-n Shamir secret sharing over the prime field GF(2^521 - 1).

Shamir sharing is polynomial arithmetic, not a cipher; its randomness comes from the
operating system's CSPRNG (``secrets``).
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: A Mersenne prime above 2^512: 32-byte secrets (keys, seeds) embed without reduction.
FIELD_PRIME = (1 << 521) - 1
SECRET_BYTES = 32
PUBLIC_KEY_BYTES = 32


class SecAggCryptoError(ValueError):
    """A key, share or ciphertext is malformed or fails authentication."""


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key (one per purpose, per client, per round)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key."""
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (for secret sharing and the client's round state)."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Rebuild a private key from its raw bytes."""
    return X25519PrivateKey.from_private_bytes(raw)


def load_public_key(raw: bytes) -> X25519PublicKey:
    """Parse a raw public key.

    Raises
    ------
    SecAggCryptoError
        When ``raw`` is not 32 bytes or is a low-order point (all-zero shared secret).
    """
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SecAggCryptoError(
            f"public key has {len(raw)} bytes, expected {PUBLIC_KEY_BYTES}"
        )
    key = X25519PublicKey.from_public_bytes(raw)
    try:
        X25519PrivateKey.generate().exchange(key)
    except ValueError as error:  # cryptography refuses low-order points
        raise SecAggCryptoError(f"public key is not usable: {error}") from None
    return key


def agree(
    private: X25519PrivateKey, peer_public: bytes, salt: bytes, purpose: bytes
) -> bytes:
    """ECDH followed by HKDF-SHA256: a 32-byte key both peers derive alike.

    Parameters
    ----------
    private : X25519PrivateKey
        Our key.
    peer_public : bytes
        The peer's raw public key.
    salt : bytes
        Binds the key to a run and round (see :func:`round_salt`).
    purpose : bytes
        Separates keys for different uses (masks, share encryption).
    """
    try:
        shared = private.exchange(load_public_key(peer_public))
    except ValueError as error:
        raise SecAggCryptoError(f"key agreement failed: {error}") from None
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=salt, info=b"fedgraft/" + purpose
    ).derive(shared)


def round_salt(run_id: int, server_round: int) -> bytes:
    """HKDF salt for one round of one run."""
    return b"fedgraft-secagg" + struct.pack(">QQ", run_id & (2**64 - 1), server_round)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM with a random 96-bit nonce: ``nonce || ciphertext || tag``."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Open :func:`encrypt`'s output.

    Raises
    ------
    SecAggCryptoError
        When the ciphertext or its associated data was altered.
    """
    if len(sealed) < 12 + 16:
        raise SecAggCryptoError("ciphertext is too short")
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], associated)
    except InvalidTag:
        raise SecAggCryptoError("ciphertext failed authentication") from None


def share_secret(
    secret: bytes, threshold: int, holders: Sequence[int]
) -> dict[int, int]:
    """Split ``secret`` into one share per holder; any ``threshold`` of them rebuild it.

    Shares are evaluations of a random degree ``threshold - 1`` polynomial at
    ``x = holder index + 1`` (never 0, which is the secret).

    Returns
    -------
    dict[int, int]
        Holder index -> share value in GF(FIELD_PRIME).
    """
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be in 1..{len(holders)} holders")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)
    ]
    shares = {}
    for holder in holders:
        x, value = holder + 1, 0
        for coefficient in reversed(coefficients):
            value = (value * x + coefficient) % FIELD_PRIME
        shares[holder] = value
    return shares


def recover_secret(shares: Mapping[int, int], threshold: int) -> bytes:
    """Lagrange interpolation at 0 from at least ``threshold`` shares.

    Raises
    ------
    SecAggCryptoError
        When fewer than ``threshold`` shares are given.
    """
    if len(shares) < threshold:
        raise SecAggCryptoError(
            f"{len(shares)} shares cannot rebuild a secret that needs {threshold}"
        )
    points = [(holder + 1, value) for holder, value in list(shares.items())[:threshold]]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % FIELD_PRIME
                denominator = denominator * (xi - xj) % FIELD_PRIME
        secret = (
            secret + yi * numerator * pow(denominator, -1, FIELD_PRIME)
        ) % FIELD_PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecAggCryptoError(
            "shares are inconsistent: the rebuilt value is not a 32-byte secret"
        )
    return secret.to_bytes(SECRET_BYTES, "big")


def share_commitment(
    purpose: bytes, salt: bytes, owner: int, holder: int, share: int
) -> bytes:
    """SHA-256 binding one share to its round, use, owner and holder (each field
    length-framed). The owner publishes it with the encrypted share, so the holder
    can check what it decrypts and the coordinator what the holder returns; a share
    is a uniform field element or a 32-byte random secret, so the digest reveals
    nothing usable about it."""
    digest = hashes.Hash(hashes.SHA256())
    for part in (
        b"fedgraft/share-commitment",
        purpose,
        salt,
        owner.to_bytes(8, "big"),
        holder.to_bytes(8, "big"),
        share_to_bytes(share),
    ):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.finalize()


def share_to_bytes(value: int) -> bytes:
    """Fixed-width encoding of a share (66 bytes covers GF(2^521 - 1))."""
    return value.to_bytes(66, "big")


def share_from_bytes(raw: bytes) -> int:
    """Inverse of :func:`share_to_bytes`, refusing out-of-field values."""
    value = int.from_bytes(raw, "big")
    if len(raw) != 66 or value >= FIELD_PRIME:
        raise SecAggCryptoError("malformed share")
    return value
