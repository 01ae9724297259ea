"""SecAgg+ (Bell et al. 2020, after Bonawitz et al. 2017) as two pure state machines,
one per side, with no Flower in them. ``server/secagg.py`` and ``client/secagg.py``
carry their inputs and outputs in Flower messages.

One round, with ``N(i)`` the neighbours of client ``i`` in a k-regular graph:

1. advertise: every client makes fresh X25519 key pairs ``c`` (share encryption) and
   ``s`` (pairwise masks) and sends the public halves.
2. share keys: with the live neighbours' public keys, client ``i`` draws a self-mask
   seed ``b_i``, splits ``b_i`` and ``s_sk_i`` t-of-|N(i)| (Shamir) and sends each
   share to its neighbour encrypted with AES-GCM under ``HKDF(ECDH(c_i, c_j))``.
3. masked input: ``y_i = x_i + PRG(b_i) + sum_j sign(i, j) PRG(HKDF(ECDH(s_i, s_j)))``
   over the neighbours that completed step 2, in Z_(2^32).
4. unmask: survivors return, per neighbour, the share of ``b_j`` (if ``j`` survived) or
   of ``s_sk_j`` (if ``j`` dropped), never both; the coordinator removes the self masks
   and the pairwise masks left dangling by dropped clients.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.secagg import crypto
from common.secagg.masking import add_mask, pair_sign, prg

_MASK_PURPOSE = b"pairwise-mask"
#: What a share is of: the self-mask seed ``b`` or the mask key ``s_sk``.
SEED_SHARE = b"self-mask-seed"
KEY_SHARE = b"mask-key"
RING_DTYPES = (np.dtype(np.uint32), np.dtype(np.uint64), np.dtype(np.uint16))
_SHARE_PURPOSE = b"share-encryption"
#: Secure-aggregation modes (run config ``secagg.mode``). ``honest-but-curious``:
#: keys relayed as sent, no consistency check; ``malicious``: signed advertisements
#: checked against each site's roster, and a consistency check before unmasking.
HONEST_BUT_CURIOUS = "honest-but-curious"
MALICIOUS = "malicious"
SECAGG_MODES = (HONEST_BUT_CURIOUS, MALICIOUS)


class ProtocolViolation(RuntimeError):
    """A party broke the protocol; the message names the node and the rule."""


def default_neighbours(num_clients: int) -> int:
    """Neighbourhood size: even, about ``2 log2 n``, at most ``n - 1``."""
    if num_clients <= 1:
        return 0
    wanted = 2 * math.ceil(math.log2(num_clients))
    return min(num_clients - 1, max(2, wanted))


def default_threshold(neighbours: int) -> int:
    """The smallest threshold above ``k / 2``."""
    return neighbours // 2 + 1


def neighbour_graph(
    nodes: Sequence[int], neighbours: int, seed: int
) -> dict[int, list[int]]:
    """A k-regular (Harary) graph over a seeded permutation of ``nodes``.

    Node at position ``p`` is linked to positions ``p +- 1 .. p +- k/2``; with an odd
    ``k`` and an even ``n`` the node opposite is linked too.
    """
    count = len(nodes)
    order = [nodes[i] for i in np.random.default_rng(seed).permutation(count)]
    graph: dict[int, set[int]] = {node: set() for node in nodes}
    for position, node in enumerate(order):
        for step in range(1, neighbours // 2 + 1):
            peer = order[(position + step) % count]
            if peer != node:
                graph[node].add(peer)
                graph[peer].add(node)
        if neighbours % 2 and count % 2 == 0:
            opposite = order[(position + count // 2) % count]
            graph[node].add(opposite)
            graph[opposite].add(node)
    return {node: sorted(peers) for node, peers in graph.items()}


def _associated(sender: int, receiver: int, salt: bytes) -> bytes:
    return salt + sender.to_bytes(8, "big") + receiver.to_bytes(8, "big")


def _share_plaintext(
    sender: int, receiver: int, seed_share: int, key_share: int
) -> bytes:
    return (
        sender.to_bytes(8, "big")
        + receiver.to_bytes(8, "big")
        + crypto.share_to_bytes(seed_share)
        + crypto.share_to_bytes(key_share)
    )


@dataclass
class ClientRound:
    """A client's secrets and view of one round.

    Parameters
    ----------
    node : int
        This client's node id.
    salt : bytes
        :func:`common.secagg.crypto.round_salt` of the run and round.
    threshold : int
        Shares needed to rebuild a secret.
    mode : str
        One of :data:`SECAGG_MODES`.
    """

    node: int
    salt: bytes
    threshold: int
    mode: str = HONEST_BUT_CURIOUS
    cipher_key: bytes = b""
    mask_key: bytes = b""
    self_seed: bytes = b""
    peers: dict[int, tuple[bytes, bytes]] = field(
        default_factory=dict
    )  # node -> (c_pk, s_pk)
    held_shares: dict[int, tuple[int, int]] = field(
        default_factory=dict
    )  # sender -> (b share, s_sk share)
    commitments: dict[int, tuple[bytes, bytes]] = field(
        default_factory=dict
    )  # holder -> commitments to the (b, s_sk) shares sent to it
    # Malicious mode: peers' long-term identities (node -> Ed25519 public key), the
    # hash of the model this client trained on, and the survivor set it signed.
    identities: dict[int, bytes] = field(default_factory=dict)
    model_hash: bytes = b""
    signed_survivors: list[int] = field(default_factory=list)
    # Distributed DP: the m whose 1/m share of the noise this client added (0: none).
    noise_shares: int = 0

    def advertise(self) -> tuple[bytes, bytes]:
        """Fresh key pairs for this round; returns the public keys (c, s)."""
        cipher, mask = crypto.new_private_key(), crypto.new_private_key()
        self.cipher_key, self.mask_key = (
            crypto.private_bytes(cipher),
            crypto.private_bytes(mask),
        )
        return crypto.public_bytes(cipher), crypto.public_bytes(mask)

    def share_keys(
        self, peer_keys: Mapping[int, tuple[bytes, bytes]]
    ) -> dict[int, bytes]:
        """Split the self-mask seed and the mask key among the live neighbours.

        Raises
        ------
        ProtocolViolation
            For too few neighbours, a malformed key, or a key shared by two nodes.
        """
        if len(peer_keys) < self.threshold:
            raise ProtocolViolation(
                f"node {self.node} has {len(peer_keys)} live neighbours, "
                f"fewer than the threshold {self.threshold}"
            )
        seen: dict[bytes, int] = {}
        own = {
            crypto.public_bytes(crypto.private_from_bytes(k))
            for k in (self.cipher_key, self.mask_key)
        }
        for peer, keys in peer_keys.items():
            for key in keys:
                try:
                    crypto.load_public_key(key)
                except (crypto.SecAggCryptoError, ValueError) as error:
                    raise ProtocolViolation(
                        f"node {peer} sent a malformed public key: {error}"
                    ) from None
                if key in seen or key in own:
                    raise ProtocolViolation(
                        f"node {peer} reuses a public key of node "
                        f"{seen.get(key, self.node)}"
                    )
                seen[key] = peer
        self.peers = dict(peer_keys)
        self.self_seed = secrets.token_bytes(crypto.SECRET_BYTES)
        holders = sorted(peer_keys)
        seed_shares = crypto.share_secret(self.self_seed, self.threshold, holders)
        key_shares = crypto.share_secret(self.mask_key, self.threshold, holders)
        cipher = crypto.private_from_bytes(self.cipher_key)
        sealed = {}
        self.commitments = {
            peer: (
                crypto.share_commitment(
                    SEED_SHARE, self.salt, self.node, peer, seed_shares[peer]
                ),
                crypto.share_commitment(
                    KEY_SHARE, self.salt, self.node, peer, key_shares[peer]
                ),
            )
            for peer in holders
        }
        for peer in holders:
            key = crypto.agree(cipher, peer_keys[peer][0], self.salt, _SHARE_PURPOSE)
            plaintext = _share_plaintext(
                self.node, peer, seed_shares[peer], key_shares[peer]
            )
            sealed[peer] = crypto.encrypt(
                key, plaintext, _associated(self.node, peer, self.salt)
            )
        return sealed

    def receive_shares(
        self,
        sealed: Mapping[int, bytes],
        commitments: Mapping[int, tuple[bytes, bytes]] | None = None,
    ) -> list[int]:
        """Decrypt the shares neighbours sent; returns senders whose ciphertext
        failed, or (given their ``commitments``, sender -> (seed, key)) whose shares
        do not match what they committed to."""
        cipher = crypto.private_from_bytes(self.cipher_key)
        failed = []
        for sender, blob in sealed.items():
            if sender not in self.peers:
                failed.append(sender)
                continue
            try:
                key = crypto.agree(
                    cipher, self.peers[sender][0], self.salt, _SHARE_PURPOSE
                )
                plaintext = crypto.decrypt(
                    key, blob, _associated(sender, self.node, self.salt)
                )
            except crypto.SecAggCryptoError:
                failed.append(sender)
                continue
            if (
                int.from_bytes(plaintext[:8], "big") != sender
                or int.from_bytes(plaintext[8:16], "big") != self.node
            ):
                failed.append(sender)
                continue
            shares = (
                crypto.share_from_bytes(plaintext[16:82]),
                crypto.share_from_bytes(plaintext[82:148]),
            )
            if commitments is not None and not self._committed(
                sender, shares, commitments.get(sender)
            ):
                failed.append(sender)
                continue
            self.held_shares[sender] = shares
        return sorted(failed)

    def _committed(
        self,
        sender: int,
        shares: tuple[int, int],
        commitments: tuple[bytes, bytes] | None,
    ) -> bool:
        """Whether ``shares`` (seed, key) from ``sender`` match its commitments."""
        return commitments is not None and all(
            crypto.share_commitment(purpose, self.salt, sender, self.node, share)
            == commitment
            for purpose, share, commitment in zip(
                (SEED_SHARE, KEY_SHARE), shares, commitments, strict=True
            )
        )

    def mask(self, encoded: np.ndarray, live_peers: Iterable[int]) -> np.ndarray:
        """Add the self mask and the pairwise masks with ``live_peers``, in the ring
        of ``encoded``'s dtype (uint32: mod 2^32; uint64: mod 2^64; uint16: mod 2^16).

        Raises
        ------
        ProtocolViolation
            When a live peer is unknown or fewer than ``threshold`` peers are live.
        """
        live = sorted(live_peers)
        unknown = [peer for peer in live if peer not in self.peers]
        if unknown:
            raise ProtocolViolation(
                f"coordinator lists node(s) {unknown} that were not neighbours "
                f"of node {self.node}"
            )
        if len(live) < self.threshold:
            raise ProtocolViolation(
                f"node {self.node} has {len(live)} live neighbours, "
                f"threshold is {self.threshold}"
            )
        if np.dtype(encoded.dtype) not in RING_DTYPES:
            raise ValueError(f"encoded input has dtype {encoded.dtype}, not a ring")
        masked = np.array(encoded, copy=True)  # (P + 1,) uint32 or uint16
        add_mask(masked, self.self_seed, +1)
        mask_key = crypto.private_from_bytes(self.mask_key)
        for peer in live:
            seed = crypto.agree(mask_key, self.peers[peer][1], self.salt, _MASK_PURPOSE)
            add_mask(masked, seed, pair_sign(self.node, peer))
        return masked

    def unmask(
        self, survivors: Iterable[int], dropped: Iterable[int]
    ) -> tuple[dict[int, int], dict[int, int]]:
        """Shares for the coordinator: ``b`` of surviving neighbours, ``s_sk`` of
        dropped ones.

        Raises
        ------
        ProtocolViolation
            When a node is listed both alive and dropped (answering would reveal both
            of its masks), or fewer than ``threshold`` neighbours survived.
        """
        alive, gone = set(survivors), set(dropped)
        both = sorted(alive & gone)
        if both:
            raise ProtocolViolation(
                f"coordinator lists node(s) {both} as both alive and dropped; "
                "refusing to answer"
            )
        if self.node not in alive:
            raise ProtocolViolation(
                f"coordinator asks node {self.node} to unmask "
                "but lists it as not surviving"
            )
        if len(alive & set(self.peers)) + 1 < self.threshold:
            raise ProtocolViolation(
                f"too few survivors around node {self.node} to unmask safely"
            )
        seed_shares = {
            j: shares[0] for j, shares in self.held_shares.items() if j in alive
        }
        key_shares = {
            j: shares[1] for j, shares in self.held_shares.items() if j in gone
        }
        return seed_shares, key_shares


@dataclass
class CoordinatorRound:
    """The coordinator's view of one round: graph, public keys and who is still live."""

    graph: dict[int, list[int]]
    threshold: int
    salt: bytes
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    def accept_keys(self, advertised: Mapping[int, tuple[bytes, bytes]]) -> list[int]:
        """Keep well-formed, unique keys; returns the nodes refused (logged by the
        caller)."""
        owners: dict[bytes, list[int]] = {}
        refused = set()
        for node, keys in advertised.items():
            try:
                for key in keys:
                    crypto.load_public_key(key)
            except (crypto.SecAggCryptoError, ValueError):
                refused.add(node)
                continue
            for key in keys:
                owners.setdefault(key, []).append(node)
            if keys[0] == keys[1]:
                refused.add(node)
        for holders in owners.values():
            if len(holders) > 1:
                refused.update(holders)
        self.public_keys = {n: k for n, k in advertised.items() if n not in refused}
        return sorted(refused)

    def live_neighbours(self, node: int, live: Iterable[int]) -> list[int]:
        """``N(node)`` restricted to ``live``."""
        alive = set(live)
        return [peer for peer in self.graph[node] if peer in alive]

    def prune(self, live: Iterable[int]) -> list[int]:
        """Drop, until stable, nodes with fewer than ``threshold`` live neighbours."""
        alive = set(live)
        while True:
            weak = {
                n for n in alive if len(self.live_neighbours(n, alive)) < self.threshold
            }
            if not weak:
                return sorted(alive)
            alive -= weak

    def unmask(
        self,
        masked: Mapping[int, np.ndarray],
        shared: Iterable[int],
        seed_shares: Mapping[int, Mapping[int, int]],
        key_shares: Mapping[int, Mapping[int, int]],
        omitted: Collection[tuple[int, int]] = (),
    ) -> np.ndarray:
        """The sum of the survivors' encoded inputs, in their ring (mod 2^32, 2^64 or
        2^16).

        Parameters
        ----------
        masked : Mapping[int, np.ndarray]
            Survivor -> masked input.
        shared : Iterable[int]
            Nodes that completed key sharing (their pairwise masks are in the inputs).
        seed_shares, key_shares : Mapping[int, Mapping[int, int]]
            Owner -> {holder: share} of self-mask seeds (survivors) and mask keys
            (dropped).
        omitted : Collection[tuple[int, int]]
            ``(survivor, dropped)`` pairs whose mask the survivor left out (it
            reported the dropped node's shares as bad).

        Raises
        ------
        ProtocolViolation
            When a secret cannot be rebuilt from the shares returned.
        """
        survivors = sorted(masked)
        length = next(iter(masked.values())).size
        ring = next(iter(masked.values())).dtype
        total = np.zeros(length, dtype=ring)  # (P + 1,) in the ring
        for vector in masked.values():
            np.add(total, vector, out=total)
        for node in survivors:
            seed = self._rebuild(node, seed_shares, "self-mask seed")
            np.subtract(total, prg(seed, length, ring), out=total)
        alive = set(survivors)
        for gone in sorted(set(shared) - alive):
            affected = [
                i
                for i in self.live_neighbours(gone, shared)
                if i in alive and (i, gone) not in omitted
            ]
            if not affected:
                continue
            mask_key = crypto.private_from_bytes(
                self._rebuild(gone, key_shares, "mask key")
            )
            for survivor in affected:
                seed = crypto.agree(
                    mask_key, self.public_keys[survivor][1], self.salt, _MASK_PURPOSE
                )
                # The survivor added sign(survivor, gone) * PRG(seed); take it back out.
                add_mask(total, seed, -pair_sign(survivor, gone))
        return total

    def _rebuild(
        self, owner: int, shares: Mapping[int, Mapping[int, int]], what: str
    ) -> bytes:
        try:
            return crypto.recover_secret(shares.get(owner, {}), self.threshold)
        except crypto.SecAggCryptoError as error:
            raise ProtocolViolation(
                f"cannot rebuild the {what} of node {owner}: {error}"
            ) from None
