"""The coordinator's SecAgg+ stage driver: a summer that learns only the sum.

``prepare`` runs the key stages (advertise, share keys) over Flower messages and
returns, for each client still in the round, the ciphertexts and live neighbours its
training message must carry. ``collect`` checks the masked uploads, runs the unmask
stage and decodes the sum. A client that drops out or misbehaves at any stage is left
out; when the survivors cannot be unmasked the round is skipped, never crashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.config import SecAggConfig
from common.secagg import crypto, identity, totals
from common.secagg.encoding import (
    RING_BITS,
    FixedPoint,
    HeadroomError,
    round_encoding,
    unflatten,
)
from common.secagg.label_sums import LabelSums, label_slots
from common.secagg.protocol import (
    KEY_SHARE,
    MALICIOUS,
    SEED_SHARE,
    CoordinatorRound,
    ProtocolViolation,
    default_neighbours,
    default_threshold,
    neighbour_graph,
)
from common.secagg.rotation import rotated_length, unrotate
from common.wire import wire_bytes, wire_list
from server.summation import RoundStats, RoundSum
from server.validation import RejectedUpdate, log_rejection, reply_metrics

log = logging.getLogger(__name__)

#: Standard deviations of the clients' summed DP noise the fixed-point range keeps
#: room for (a coordinate beyond it, odds about 1e-15, would wrap around).
NOISE_HEADROOM_STDS = 8.0

ADVERTISE = f"{MessageType.QUERY}.{keys.ACTION_SECAGG_ADVERTISE}"
SHARE = f"{MessageType.QUERY}.{keys.ACTION_SECAGG_SHARE}"
UNMASK = f"{MessageType.QUERY}.{keys.ACTION_SECAGG_UNMASK}"
CONSISTENCY = f"{MessageType.QUERY}.{keys.ACTION_SECAGG_CONSISTENCY}"
#: The two kinds of share a holder returns, in the order of ``_returned_shares``.
SHARE_KINDS = (SEED_SHARE, KEY_SHARE)


@dataclass(frozen=True)
class RingExtras:
    """What the clients add to the ring beyond their weighted deltas this round.

    Attributes
    ----------
    noise_std : float
        Std of their summed noise on each delta coordinate (distributed DP).
    tail : int
        Values each client appends after its weight, unclipped and unweighted
        (adaptive clipping's unclipped bit).
    tail_noise_std : float
        Std of their summed noise on each of those.
    """

    noise_std: float = 0.0
    tail: int = 0
    tail_noise_std: float = 0.0


class SecureSum:
    """SecAgg+ over Flower's Message API.

    Parameters
    ----------
    settings : SecAggConfig
        Neighbours, threshold, clip norm, weight scaling and stage timeout.
    seed : int
        Seeds each round's neighbour graph.
    extras : Callable[[], RingExtras], optional
        Asked at every round: the noise the clients add (distributed DP) and the
        values they append (adaptive clipping), which the encoding leaves room
        for; none without DP.
    ring_bits : int
        32, or 16 (the quantising codecs: half the upload): clients then rotate their
        delta with a public seed of the round before encoding it
        (``common.secagg.rotation``) and the coordinator rotates the sum back.
    unit_weights : bool
        Every client encodes weight 1 (client-level DP): a decoded total weight
        other than the cohort's size then means a forged weight slot.
    label_sums : bool
        Clients append their per-label head sums (``aggregation =
        fedavg-per-label``, :mod:`common.secagg.label_sums`) after their other
        values; they arrive in :attr:`server.summation.RoundSum.label_sums`.
    """

    def __init__(
        self,
        settings: SecAggConfig,
        seed: int,
        extras: Callable[[], RingExtras] | None = None,
        ring_bits: int = RING_BITS,
        unit_weights: bool = False,
        label_sums: bool = False,
    ) -> None:
        self.settings = settings
        self.label_sums = label_sums
        self.ring_bits = ring_bits
        self._rotation_seed = b""
        self.seed = seed
        self.extras = extras
        self.unit_weights = unit_weights
        self._tail = 0
        self._round: CoordinatorRound | None = None
        self._shared: list[int] = []
        self._senders: dict[int, list[int]] = {}
        # owner -> holder -> commitments to the (seed, key) shares owner sent holder
        self._commitments: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        # (accuser, accused): pairwise masks the accuser left out of its upload
        self._omitted: set[tuple[int, int]] = set()
        self._extras = RingExtras()
        self._encoding: FixedPoint | None = None
        # Malicious mode: each node's long-term identity and advertisement signature.
        self._signed: dict[int, tuple[bytes, bytes]] = {}

    # -- key stages --------------------------------------------------------------------

    def prepare(
        self, grid: Grid, nodes: Sequence[int], server_round: int, stats: RoundStats
    ) -> dict[int, ConfigRecord | None]:
        """Advertise and share keys; returns the clients that go on, with their
        inbox."""
        self._round = None
        if len(nodes) < 2:
            log.warning(
                "secure aggregation needs at least 2 clients, round %d has %d",
                server_round,
                len(nodes),
            )
            return {}
        k = self.settings.neighbours or default_neighbours(len(nodes))
        k = min(k, len(nodes) - 1)
        t = self.settings.threshold or default_threshold(k)
        if not k / 2 < t <= k:
            log.warning(
                "round %d skipped: threshold %d must be in (k/2, k] "
                "for k = %d neighbours",
                server_round,
                t,
                k,
            )
            return {}
        salt = crypto.round_salt(grid.run.run_id, server_round)
        protocol = CoordinatorRound(
            neighbour_graph(list(nodes), k, self.seed * 7_919 + server_round), t, salt
        )

        setup = {
            keys.CFG_ROUND: server_round,
            keys.SECAGG_THRESHOLD: t,
            keys.SECAGG_MODE: self.settings.mode,
        }
        advertised = {}
        self._signed = {}
        for reply in self._stage(
            grid, nodes, ADVERTISE, lambda node: ConfigRecord(setup), stats
        ):
            node = reply.metadata.src_node_id
            try:
                record = reply.content.config_records[keys.SECAGG_RECORD]
                advertised[node] = (
                    wire_bytes(record[keys.SECAGG_CIPHER_PK], "cipher public key"),
                    wire_bytes(record[keys.SECAGG_MASK_PK], "mask public key"),
                )
                if self.settings.mode == MALICIOUS:
                    self._signed[node] = self._signed_advertisement(
                        record, salt, node, advertised[node]
                    )
            except Exception as error:  # noqa: BLE001 - one bad reply, one node out
                advertised.pop(node, None)
                log_rejection(
                    node, RejectedUpdate(f"malformed key advertisement: {error}")
                )
                stats.rejected += 1
        for node in protocol.accept_keys(advertised):
            log_rejection(node, RejectedUpdate("malformed or duplicate public key"))
            stats.rejected += 1
        live = protocol.prune(protocol.public_keys)

        def share_request(node: int) -> ConfigRecord:
            peers = protocol.live_neighbours(node, live)
            record = ConfigRecord(
                {
                    **setup,
                    keys.SECAGG_COHORT: len(live),
                    keys.SECAGG_PEERS: [str(p) for p in peers],
                    keys.SECAGG_PEER_CIPHER_PKS: [
                        protocol.public_keys[p][0] for p in peers
                    ],
                    keys.SECAGG_PEER_MASK_PKS: [
                        protocol.public_keys[p][1] for p in peers
                    ],
                }
            )
            if self.settings.mode == MALICIOUS:
                record[keys.SECAGG_PEER_IDENTITIES] = [
                    self._signed[p][0] for p in peers
                ]
                record[keys.SECAGG_PEER_SIGNATURES] = [
                    self._signed[p][1] for p in peers
                ]
            return record

        sealed: dict[int, dict[int, bytes]] = {}
        self._commitments = {}
        for reply in self._stage(grid, live, SHARE, share_request, stats):
            node = reply.metadata.src_node_id
            try:
                record = reply.content.config_records[keys.SECAGG_RECORD]
                receivers = [
                    int(r) for r in wire_list(record[keys.SECAGG_PEERS], "receivers")
                ]
                blobs, seed_commitments, key_commitments = (
                    [wire_bytes(b, name) for b in wire_list(record[name], name)]
                    for name in (
                        keys.SECAGG_SEALED,
                        keys.SECAGG_SEED_COMMITMENTS,
                        keys.SECAGG_KEY_COMMITMENTS,
                    )
                )
                if sorted(receivers) != protocol.live_neighbours(node, live) or not (
                    len(blobs)
                    == len(seed_commitments)
                    == len(key_commitments)
                    == len(receivers)
                ):
                    raise ValueError(
                        "shares and commitments are not addressed to exactly its "
                        "live neighbours"
                    )
            except Exception as error:  # noqa: BLE001 - one bad reply, one node out
                log_rejection(node, RejectedUpdate(f"bad key shares: {error}"))
                stats.rejected += 1
                continue
            sealed[node] = dict(zip(receivers, blobs, strict=True))
            self._commitments[node] = dict(
                zip(
                    receivers,
                    zip(seed_commitments, key_commitments, strict=True),
                    strict=True,
                )
            )
        self._shared = sorted(sealed)
        participants = protocol.prune(self._shared)
        if len(participants) < 2:
            log.warning(
                "round %d skipped: %d client(s) completed secure-aggregation setup",
                server_round,
                len(participants),
            )
            return {}
        # Each coordinate of the sum stays within n * clip, plus the noise's headroom;
        # an appended bit's sum within n, plus its noise's.
        extras = self.extras() if self.extras else RingExtras()
        self._tail = extras.tail
        n = len(participants)
        bound = self.settings.clip_norm + NOISE_HEADROOM_STDS * extras.noise_std / n
        if extras.tail:
            bound = max(bound, 1.0 + NOISE_HEADROOM_STDS * extras.tail_noise_std / n)
        narrow = self.ring_bits < RING_BITS
        self._rotation_seed = (
            hashlib.sha256(salt + b"rotation").digest() if narrow else b""
        )
        try:
            self._encoding = dataclasses.replace(
                round_encoding(n, bound, self.settings.max_weight, self.ring_bits),
                clip_norm=self.settings.clip_norm,
            )
        except HeadroomError as error:
            log.warning("round %d skipped: %s", server_round, error)
            return {}
        self._round, self._extras = protocol, extras
        self._senders = {
            node: [
                s
                for s in protocol.live_neighbours(node, self._shared)
                if node in sealed[s]
            ]
            for node in participants
        }

        def inbox(node: int) -> ConfigRecord:
            senders = self._senders[node]
            return ConfigRecord(
                {
                    **setup,
                    keys.SECAGG_COHORT: len(participants),
                    keys.SECAGG_PEERS: [
                        str(p) for p in protocol.live_neighbours(node, self._shared)
                    ],
                    keys.SECAGG_SENDERS: [str(s) for s in senders],
                    keys.SECAGG_SEALED: [sealed[s][node] for s in senders],
                    keys.SECAGG_SEED_COMMITMENTS: [
                        self._commitments[s][node][0] for s in senders
                    ],
                    keys.SECAGG_KEY_COMMITMENTS: [
                        self._commitments[s][node][1] for s in senders
                    ],
                    keys.SECAGG_SCALE: self._encoding.scale,  # type: ignore[union-attr]
                    keys.SECAGG_CLIP: self.settings.clip_norm,
                    keys.SECAGG_MAX_WEIGHT: self.settings.max_weight,
                    keys.SECAGG_RING_BITS: self._encoding.ring_bits,  # type: ignore[union-attr]
                    keys.SECAGG_COORDINATE_BOUND: self._encoding.coordinate_bound,  # type: ignore[union-attr]
                    keys.SECAGG_ROTATION_SEED: self._rotation_seed,
                }
            )

        return {node: inbox(node) for node in participants}

    # -- masked input and unmasking ----------------------------------------------------

    def collect(
        self,
        grid: Grid,
        replies: Sequence[Message],
        reference: Mapping[str, np.ndarray],
        stats: RoundStats,
    ) -> RoundSum | None:
        """Check the masked uploads, unmask their sum, decode it and check it
        against the bounds every honest upload keeps."""
        protocol, encoding = self._round, self._encoding
        if protocol is None or encoding is None:
            return None
        tail = self._tail
        size = sum(v.size for v in reference.values())
        narrow = encoding.ring_bits < RING_BITS
        # [weighted delta, weight] + tail + per-label sums
        weights_end = (rotated_length(size) if narrow else size) + 1
        tail_end = weights_end + tail
        slots = label_slots(reference) if self.label_sums else 0
        length = tail_end + slots
        masked, metrics = self._uploads(replies, length, np.dtype(encoding.ring), stats)
        ring_sum = self._unmasked_sum(protocol, grid, masked, stats)
        if ring_sum is None:
            return None
        survivors = sorted(masked)
        weighted, weight = encoding.decode_sum(ring_sum[:weights_end])
        if narrow:
            weighted = unrotate(weighted, self._rotation_seed, size)
        # The tail and the label sums decode like the weight: signed, in steps of
        # 1 / scale.
        appended = encoding.decode(ring_sum[weights_end:tail_end])
        label_sums = (
            LabelSums.from_vector(encoding.decode(ring_sum[tail_end:]), reference)
            if slots
            else None
        )
        problem = self._out_of_bounds(weighted, weight, appended, len(survivors))
        if not problem and label_sums is not None:
            problem = label_sums.problem(
                weight, encoding.clip_norm, len(survivors), 1 / encoding.scale
            )
        if problem:
            log.warning(
                "round skipped: the unmasked sum of %d client(s) %s, which no honest "
                "upload can cause; a client forged its masked vector (the masks "
                "hide which)",
                len(survivors),
                problem,
            )
            return None
        return RoundSum(
            total=unflatten(weighted, reference),
            weight=weight,
            count=len(survivors),
            client_metrics=[metrics[n] for n in survivors],
            nodes=survivors,
            reference=dict(reference),
            unclipped=float(appended[0]) if tail else None,
            label_sums=label_sums,
        )

    def collect_totals(
        self, grid: Grid, replies: Sequence[Message], width: int, stats: RoundStats
    ) -> tuple[np.ndarray, list[int]] | None:
        """A secure evaluation: the sum of the sites' ``width`` evaluation totals
        (exact, :mod:`common.secagg.totals`) and the sites in it, or ``None`` when
        it cannot be unmasked or no honest upload can cause it."""
        protocol = self._round
        if protocol is None:
            return None
        length = width * totals.LIMBS
        masked, _ = self._uploads(replies, length, np.dtype(np.uint32), stats)
        ring_sum = self._unmasked_sum(protocol, grid, masked, stats)
        if ring_sum is None:
            return None
        survivors = sorted(masked)
        if not totals.within_limbs(ring_sum, len(survivors)):
            log.warning(
                "evaluation skipped: the unmasked totals of %d site(s) exceed what "
                "honest uploads can sum to; a site forged its masked vector",
                len(survivors),
            )
            return None
        return totals.decode_totals(ring_sum, totals.EVAL_FRACTIONAL), survivors

    def collect_fixed_point(
        self,
        grid: Grid,
        replies: Sequence[Message],
        length: int,
        encoding: FixedPoint,
        stats: RoundStats,
    ) -> tuple[np.ndarray, list[int]] | None:
        """A secure sum of ``length`` values each site encoded in ``encoding`` (its
        own fixed point, not the round's update encoding): the decoded ``(length,)
        float64`` sum and the sites in it, or ``None`` when it cannot be unmasked.
        The caller checks the sum against what honest sites can send."""
        protocol = self._round
        if protocol is None:
            return None
        masked, _ = self._uploads(replies, length, np.dtype(encoding.ring), stats)
        ring_sum = self._unmasked_sum(protocol, grid, masked, stats)
        if ring_sum is None:
            return None
        return encoding.decode(ring_sum), sorted(masked)

    def _unmasked_sum(
        self,
        protocol: CoordinatorRound,
        grid: Grid,
        masked: Mapping[int, np.ndarray],
        stats: RoundStats,
    ) -> np.ndarray | None:
        """Run the unmask stage for the uploaders of ``masked``: the ring sum of
        their vectors, or ``None`` when there is none or it cannot be unmasked."""
        if not masked:
            return None
        survivors = sorted(masked)
        signed = (
            self._consistency(grid, survivors, stats)
            if self.settings.mode == MALICIOUS
            else {}
        )
        if signed is None:
            return None
        seed_shares, key_shares = self._unmask_shares(grid, survivors, signed, stats)
        try:
            return protocol.unmask(
                dict(masked), self._shared, seed_shares, key_shares, self._omitted
            )
        except ProtocolViolation as error:
            log.warning(
                "secure aggregation could not unmask this round (%s); "
                "the round is skipped",
                error,
            )
            return None

    def _uploads(
        self,
        replies: Sequence[Message],
        length: int,
        ring: np.dtype,
        stats: RoundStats,
    ) -> tuple[dict[int, np.ndarray], dict[int, dict[str, float]]]:
        """The well-formed masked uploads and their metrics, by node, less the nodes
        an accusation removes (:meth:`_settle_accusations`)."""
        masked: dict[int, np.ndarray] = {}
        metrics: dict[int, dict[str, float]] = {}
        accusations: dict[int, set[int]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                vector = self._masked_vector(reply, length, ring)
                figures = reply_metrics(reply)
                record = reply.content.config_records.get(keys.SECAGG_RECORD)
                accused = (
                    wire_list(record.get(keys.SECAGG_BAD_SENDERS, []), "accusations")
                    if record is not None
                    else []
                )
                accusations[node] = {int(s) for s in accused}
            # A crafted reply may make any step raise: it rejects this reply alone.
            except Exception as reason:  # noqa: BLE001
                log_rejection(node, reason)
                stats.rejected += 1
                continue
            masked[node], metrics[node] = vector, figures
        for node in self._settle_accusations(accusations, set(masked)):
            stats.rejected += 1
            del masked[node], metrics[node]
        return masked, metrics

    def _settle_accusations(
        self, accusations: Mapping[int, set[int]], uploaded: set[int]
    ) -> list[int]:
        """The uploaders to leave out for their accusations (logged).

        A client may only accuse the neighbours whose shares it was handed; one that
        names anybody else is lying and goes alone. A node accused by at least
        ``threshold`` neighbours goes alone: SecAgg+ already assumes fewer than that
        many corrupt neighbours (they could unmask it otherwise). Below that the
        coordinator cannot tell who lies, so the accusers go with the accused: no
        client can exclude another while itself staying in.
        """
        removed: set[int] = set()
        backers: dict[int, set[int]] = {}
        self._omitted = set()
        for accuser in sorted(a for a in accusations if a in uploaded):
            accused = accusations[accuser]
            if not accused <= set(self._senders.get(accuser, ())):
                log_rejection(
                    accuser,
                    RejectedUpdate(
                        f"it accuses node(s) {sorted(accused)} that did not send it "
                        "key shares"
                    ),
                )
                removed.add(accuser)
                continue
            for node in accused:
                backers.setdefault(node, set()).add(accuser)
                self._omitted.add((accuser, node))  # it masked without node
        threshold = self._round.threshold if self._round is not None else 1
        for node, accusers in sorted(backers.items()):
            accusers -= removed
            leaving = {node} if len(accusers) >= threshold else accusers | {node}
            for each in sorted(leaving):
                log_rejection(
                    each,
                    RejectedUpdate(
                        f"node(s) {sorted(accusers)} report that key shares from "
                        f"node {node} failed authentication or their commitment; "
                        + (
                            "enough to believe them"
                            if leaving == {node}
                            else "accusers and accused are all left out"
                        )
                    ),
                )
            removed |= leaving
        return sorted(removed & uploaded)

    def _unmask_shares(
        self,
        grid: Grid,
        survivors: list[int],
        signed: Mapping[int, bytes],
        stats: RoundStats,
    ) -> tuple[dict[int, dict[int, int]], dict[int, dict[int, int]]]:
        """Run the unmask stage (with the survivors' consistency signatures in
        malicious mode): owner -> {holder: share} of the survivors' self-mask seeds
        and of the dropped clients' mask keys, each checked against the commitment
        its owner made in the key stage (a share that fails is dropped, naming the
        holder that returned it)."""
        dropped = sorted(set(self._shared) - set(survivors))
        request = ConfigRecord(
            {
                keys.SECAGG_SURVIVORS: [str(n) for n in survivors],
                keys.SECAGG_DROPPED: [str(n) for n in dropped],
            }
        )
        if signed:
            request[keys.SECAGG_SIGNERS] = [str(n) for n in signed]
            request[keys.SECAGG_SIGNER_IDENTITIES] = [
                self._signed[n][0] for n in signed
            ]
            request[keys.SECAGG_SIGNATURES] = list(signed.values())
        shares: tuple[dict[int, dict[int, int]], ...] = ({}, {})  # seeds, keys
        for reply in self._stage(
            grid, survivors, UNMASK, lambda node: request, stats, count_failures=False
        ):
            holder = reply.metadata.src_node_id
            try:
                returned = _returned_shares(reply)
            except Exception as error:  # noqa: BLE001 - its shares are ignored
                log.warning("node %d sent unusable unmask shares: %s", holder, error)
                continue
            for kind, owner, share in returned:
                if self._committed(kind, owner, holder, share):
                    shares[kind].setdefault(owner, {})[holder] = share
                else:
                    log.warning(
                        "node %d returned a share of node %s's %s that does not "
                        "match the commitment made for it; the share is ignored",
                        holder,
                        owner,
                        SHARE_KINDS[kind].decode(),
                    )
        return shares

    def _committed(self, kind: int, owner: int, holder: int, share: int) -> bool:
        """Whether ``share`` is what ``owner`` committed to sending ``holder``."""
        assert self._round is not None
        commitments = self._commitments.get(owner, {}).get(holder)
        return commitments is not None and commitments[kind] == (
            crypto.share_commitment(
                SHARE_KINDS[kind], self._round.salt, owner, holder, share
            )
        )

    def _out_of_bounds(
        self,
        weighted: np.ndarray,
        weight: float,
        appended: np.ndarray,
        count: int,
    ) -> str:
        """What the decoded sum breaks, or ``""``.

        Every honest client sends a weight ``w`` in ``[1 / max-weight, 1]`` (1
        exactly with ``unit_weights``) and a
        weighted delta of norm at most ``w * clip``; so the total weight lies in
        ``[n / max-weight, n]`` and the sum's norm is at most ``total weight *
        clip``, up to one rounding step per client and coordinate and the summed
        DP noise (its norm, with ``NOISE_HEADROOM_STDS`` spare). An appended
        unclipped bit is ``+-1/2`` per client, plus its noise.
        """
        encoding = self._encoding
        assert encoding is not None
        extras = self._extras
        step = count / encoding.scale  # one rounding step per client
        lowest = count if self.unit_weights else count / encoding.max_weight
        low, high = lowest - step, count + step
        if not low <= weight <= high:
            return f"has total weight {weight:.6g} outside [{low:.6g}, {high:.6g}]"
        norm = float(np.linalg.norm(weighted))
        root = math.sqrt(weighted.size)
        limit = (
            weight * encoding.clip_norm
            + root * step
            + extras.noise_std * (root + NOISE_HEADROOM_STDS)
        )
        if not norm <= limit:
            return (
                f"has norm {norm:.6g} above total weight x secagg.clip-norm "
                f"(with rounding and noise: {limit:.6g})"
            )
        tail_limit = count / 2 + step + NOISE_HEADROOM_STDS * extras.tail_noise_std
        if appended.size and not (np.abs(appended) <= tail_limit).all():
            return f"has an appended count beyond +-{tail_limit:.6g}"
        return ""

    # -- malicious mode ----------------------------------------------------------------

    @staticmethod
    def _signed_advertisement(
        record: ConfigRecord, salt: bytes, node: int, public_keys: tuple[bytes, bytes]
    ) -> tuple[bytes, bytes]:
        """A node's identity and advertisement signature, checked against the
        identity it names (the sites check that identity against their roster).

        Raises
        ------
        RejectedUpdate
            When the signature is missing or does not verify.
        """
        who = wire_bytes(record.get(keys.SECAGG_IDENTITY, b""), "identity")
        signature = wire_bytes(record.get(keys.SECAGG_SIGNATURE, b""), "signature")
        statement = identity.advertisement_statement(salt, node, *public_keys)
        if not identity.verify(who, signature, statement):
            raise RejectedUpdate("its key advertisement's signature does not verify")
        return who, signature

    def _consistency(
        self, grid: Grid, survivors: list[int], stats: RoundStats
    ) -> dict[int, bytes] | None:
        """The consistency check: every survivor signs the survivor set and the hash
        of the model it trained on. Returns node -> signature, or ``None`` (the round
        is skipped) when a survivor does not sign or signs something else."""
        request = ConfigRecord({keys.SECAGG_SURVIVORS: [str(n) for n in survivors]})
        signatures: dict[int, bytes] = {}
        for reply in self._stage(
            grid, survivors, CONSISTENCY, lambda node: request, stats, False
        ):
            node = reply.metadata.src_node_id
            try:
                record = reply.content.config_records[keys.SECAGG_RECORD]
                who = wire_bytes(record[keys.SECAGG_IDENTITY], "identity")
                if who != self._signed[node][0]:
                    raise RejectedUpdate("signed with another identity than its keys")
                signatures[node] = wire_bytes(
                    record[keys.SECAGG_SIGNATURE], "signature"
                )
            # A crafted reply may make any step raise: it leaves this signature out.
            except Exception as error:  # noqa: BLE001
                log_rejection(node, RejectedUpdate(f"bad consistency reply: {error}"))
        missing = sorted(set(survivors) - set(signatures))
        if missing:
            log.warning(
                "round skipped: survivor(s) %s did not sign the consistency check "
                "(secagg.mode = malicious unmasks only a set every survivor signed)",
                missing,
            )
            return None
        return signatures

    # -- helpers -----------------------------------------------------------------------

    def _stage(
        self,
        grid: Grid,
        nodes: Sequence[int],
        message_type: str,
        request: callable,  # type: ignore[valid-type]
        stats: RoundStats,
        count_failures: bool = True,
    ) -> list[Message]:
        messages = [
            Message(RecordDict({keys.SECAGG_RECORD: request(node)}), node, message_type)
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=self.settings.timeout))
        usable = []
        for reply in replies:
            if reply.has_error():
                reason = (reply.error.reason or "").strip().splitlines()
                log.warning(
                    "node %d dropped out at %s: %s",
                    reply.metadata.src_node_id,
                    message_type,
                    reason[-1] if reason else "",
                )
                continue
            usable.append(reply)
        missing = set(nodes) - {r.metadata.src_node_id for r in usable}
        if count_failures:
            stats.failed += len(missing)
        for node in sorted(set(nodes) - {r.metadata.src_node_id for r in replies}):
            log.warning(
                "node %d did not answer %s within secagg.timeout", node, message_type
            )
        return usable

    @staticmethod
    def _masked_vector(reply: Message, length: int, ring: np.dtype) -> np.ndarray:
        """The upload as a read-only view in the ``ring`` dtype (uint32, uint64 or
        uint16),
        checked before it is decoded."""
        records = reply.content.array_records
        if keys.MASKED_RECORD not in records or len(records[keys.MASKED_RECORD]) != 1:
            raise ValueError(f"reply has no single '{keys.MASKED_RECORD}' array")
        array = next(iter(records[keys.MASKED_RECORD].values()))
        if array.stype != "numpy.ndarray" or np.dtype(array.dtype) != ring:
            raise ValueError(f"masked upload has dtype {array.dtype}, expected {ring}")
        if tuple(array.shape) != (length,):
            raise ValueError(
                f"masked upload has shape {tuple(array.shape)}, expected ({length},)"
            )
        # Skip np.load's copy: read the .npy header, then view the payload in place.
        stream = io.BytesIO(array.data)
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(
                f"masked upload uses .npy format {version}, expected 1.0 or 2.0"
            )
        little = ring.newbyteorder("<")
        if shape != (length,) or dtype != little or fortran:
            raise ValueError(
                "masked upload's payload does not match its declared shape and dtype"
            )
        return np.frombuffer(
            array.data, dtype=little, count=length, offset=stream.tell()
        )


def _returned_shares(reply: Message) -> list[tuple[int, int, int]]:
    """``(kind, owner, share)`` for every share of an unmask reply (kind 0: a
    self-mask seed's, 1: a mask key's), parsed without trusting the types."""
    record = reply.content.config_records[keys.SECAGG_RECORD]
    return [
        (kind, int(owner), crypto.share_from_bytes(wire_bytes(share, values)))
        for kind, (owners, values) in enumerate(
            (
                (keys.SECAGG_SEED_OWNERS, keys.SECAGG_SEED_SHARES),
                (keys.SECAGG_KEY_OWNERS, keys.SECAGG_KEY_SHARES),
            )
        )
        for owner, share in zip(
            wire_list(record[owners], owners),
            wire_list(record[values], values),
            strict=True,
        )
    ]
