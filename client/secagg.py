"""The client's SecAgg+ stage handlers.

The round's secrets (private keys, self-mask seed, shares held for neighbours) live in
the node's ``context.state``, which Flower keeps at the site between the messages of a
run; they never leave it except as the protocol's encrypted shares.

Before each stage the site checks the coordinator's request against its own policy
(``client.site_policy``: floors, roster, one masking per round) and refuses, with a
log line saying why, a round that falls short. In ``secagg.mode = malicious`` it also
signs its key advertisement, verifies its neighbours' against its roster, and signs
and checks the survivor set and model hash before it helps unmask anyone.

Every field of a coordinator's request is read through
``client.coordinator_request`` (its type and range checked: a crafted integer
never reaches ``bytes()``), so a malformed message is a logged refusal.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.coordinator_request import (
    MAX_CLIENTS,
    CoordinatorRequest,
    MalformedRequest,
)
from client.site_policy import SitePolicy, SiteRefusal
from common import keys
from common.secagg import crypto, identity
from common.secagg.encoding import (
    NARROW_RING_BITS,
    RING_BITS,
    WIDE_RING_BITS,
    FixedPoint,
)
from common.secagg.label_sums import site_label_sums
from common.secagg.protocol import (
    HONEST_BUT_CURIOUS,
    MALICIOUS,
    ClientRound,
    ProtocolViolation,
)
from common.secagg.rotation import rotate
from common.secagg.totals import EVAL_FRACTIONAL, encode_totals
from common.wire import to_array_record

log = logging.getLogger(__name__)

Step = TypeVar("Step", bound=Callable[..., Any])


def refusals_logged(step: Step) -> Step:
    """Log a site's refusal before Flower turns it into an error reply, so the
    site's own log says why it did not take part."""

    @functools.wraps(step)
    def logged(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except ProtocolViolation as refusal:
            log.error("secure aggregation refused by this site: %s", refusal)
            raise

    return cast(Step, logged)


def _ids(values: object) -> list[int]:
    return [int(v) for v in values]  # type: ignore[union-attr]


def _save(context: Context, state: ClientRound, server_round: int) -> None:
    held = sorted(state.held_shares)
    context.state[keys.SECAGG_STATE] = ConfigRecord(
        {
            "round": server_round,
            "node": str(state.node),
            "salt": state.salt,
            "threshold": state.threshold,
            "mode": state.mode,
            "identity-of": [str(p) for p in state.identities],
            "identities": list(state.identities.values()),
            "model-hash": state.model_hash,
            "signed-survivors": [str(n) for n in state.signed_survivors],
            "noise-shares": state.noise_shares,
            "cipher-key": state.cipher_key,
            "mask-key": state.mask_key,
            "self-seed": state.self_seed,
            "peers": [str(p) for p in state.peers],
            "peer-cipher": [state.peers[p][0] for p in state.peers],
            "peer-mask": [state.peers[p][1] for p in state.peers],
            "held-from": [str(h) for h in held],
            "held-seed": [crypto.share_to_bytes(state.held_shares[h][0]) for h in held],
            "held-key": [crypto.share_to_bytes(state.held_shares[h][1]) for h in held],
        }
    )


def _load(context: Context, server_round: int) -> ClientRound:
    if keys.SECAGG_STATE not in context.state.config_records:
        raise ProtocolViolation(
            "no secure-aggregation state for this round: the key stages were skipped"
        )
    record = context.state.config_records[keys.SECAGG_STATE]
    if int(record["round"]) != server_round:  # type: ignore[arg-type]
        raise ProtocolViolation(
            f"secure-aggregation state is for round {record['round']}, "
            f"not {server_round}"
        )
    state = ClientRound(
        int(record["node"]),  # type: ignore[arg-type]
        bytes(record["salt"]),  # type: ignore[arg-type]
        int(record["threshold"]),  # type: ignore[arg-type]
        str(record["mode"]),
    )
    state.identities = {
        int(p): bytes(i)
        for p, i in zip(record["identity-of"], record["identities"], strict=True)  # type: ignore[arg-type]
    }
    state.model_hash = bytes(record["model-hash"])  # type: ignore[arg-type]
    state.signed_survivors = _ids(record["signed-survivors"])
    state.noise_shares = int(record.get("noise-shares", 0))  # type: ignore[arg-type]
    state.cipher_key, state.mask_key = (
        bytes(record["cipher-key"]),
        bytes(record["mask-key"]),
    )  # type: ignore[arg-type]
    state.self_seed = bytes(record["self-seed"])  # type: ignore[arg-type]
    state.peers = {
        int(p): (bytes(c), bytes(m))
        for p, c, m in zip(
            record["peers"], record["peer-cipher"], record["peer-mask"], strict=True
        )  # type: ignore[arg-type]
    }
    state.held_shares = {
        int(h): (crypto.share_from_bytes(bytes(s)), crypto.share_from_bytes(bytes(k)))
        for h, s, k in zip(
            record["held-from"], record["held-seed"], record["held-key"], strict=True
        )  # type: ignore[arg-type]
    }
    return state


def _reply(message: Message, record: ConfigRecord) -> Message:
    return Message(RecordDict({keys.SECAGG_RECORD: record}), reply_to=message)


@refusals_logged
def advertise(message: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs for this round; reply with the public halves (signed
    with the site's long-term key in malicious mode)."""
    request = CoordinatorRequest.of(message, keys.SECAGG_RECORD, "advertise")
    server_round = request.server_round(keys.CFG_ROUND)
    mode = request.text(keys.SECAGG_MODE, default=HONEST_BUT_CURIOUS)
    threshold = request.integer(keys.SECAGG_THRESHOLD, 1, MAX_CLIENTS)
    policy = SitePolicy.from_node_config(context.node_config)
    policy.check_mode(mode)
    policy.check_threshold(threshold)
    salt = crypto.round_salt(message.metadata.run_id, server_round)
    state = ClientRound(context.node_id, salt, threshold, mode)
    cipher_pk, mask_pk = state.advertise()
    _save(context, state, server_round)
    reply = {keys.SECAGG_CIPHER_PK: cipher_pk, keys.SECAGG_MASK_PK: mask_pk}
    if policy.signing_key is not None:
        statement = identity.advertisement_statement(
            salt, context.node_id, cipher_pk, mask_pk
        )
        reply[keys.SECAGG_IDENTITY] = identity.public_raw(policy.signing_key)
        reply[keys.SECAGG_SIGNATURE] = policy.signing_key.sign(statement)
    return _reply(message, ConfigRecord(reply))


@refusals_logged
def share_keys(message: Message, context: Context) -> Message:
    """Stage 2: check the round against the site's floors (and, in malicious mode,
    every neighbour's signed advertisement against the roster), then secret-share
    the self-mask seed and the mask key among the live neighbours."""
    request = CoordinatorRequest.of(message, keys.SECAGG_RECORD, "share keys")
    server_round = request.server_round(keys.CFG_ROUND)
    state = _load(context, server_round)
    ids = request.node_ids(keys.SECAGG_PEERS)
    peers = dict(
        zip(
            ids,
            zip(
                request.blobs(keys.SECAGG_PEER_CIPHER_PKS, len(ids)),
                request.blobs(keys.SECAGG_PEER_MASK_PKS, len(ids)),
                strict=True,
            ),
            strict=True,
        )
    )
    policy = SitePolicy.from_node_config(context.node_config)
    policy.check_threshold(state.threshold)
    policy.check_neighbours(state.threshold, len(peers))
    policy.check_cohort(request.integer(keys.SECAGG_COHORT, 0, MAX_CLIENTS, 0))
    if state.mode == MALICIOUS:
        state.identities = _verified_advertisements(policy, state, request, peers)
    sealed = state.share_keys(peers)
    _save(context, state, server_round)
    return _reply(
        message,
        ConfigRecord(
            {
                keys.SECAGG_PEERS: [str(p) for p in sealed],
                keys.SECAGG_SEALED: list(sealed.values()),
                keys.SECAGG_SEED_COMMITMENTS: [state.commitments[p][0] for p in sealed],
                keys.SECAGG_KEY_COMMITMENTS: [state.commitments[p][1] for p in sealed],
            }
        ),
    )


def _sender_commitments(
    request: CoordinatorRequest, senders: list[int]
) -> dict[int, tuple[bytes, bytes]] | None:
    """Each sender's commitments to the (seed, key) shares it sent this site, when
    the coordinator relayed them."""
    if keys.SECAGG_SEED_COMMITMENTS not in request:
        return None
    pairs = zip(
        request.blobs(keys.SECAGG_SEED_COMMITMENTS, len(senders)),
        request.blobs(keys.SECAGG_KEY_COMMITMENTS, len(senders)),
        strict=True,
    )
    return dict(zip(senders, pairs, strict=True))


def _verified_advertisements(
    policy: SitePolicy,
    state: ClientRound,
    request: CoordinatorRequest,
    peers: dict[int, tuple[bytes, bytes]],
) -> dict[int, bytes]:
    """Each neighbour's identity, after checking that a distinct site of the roster
    (not this one) signed exactly the keys the coordinator relayed for it.

    Raises
    ------
    SiteRefusal
        Naming the neighbour whose advertisement fails: the coordinator (or the
        network) altered its keys, or it is not a site of the roster.
    """
    assert policy.roster is not None and policy.signing_key is not None
    own = identity.public_raw(policy.signing_key)
    if (
        keys.SECAGG_PEER_IDENTITIES not in request
        or keys.SECAGG_PEER_SIGNATURES not in request
    ):
        raise SiteRefusal(
            "the coordinator relayed neighbours' keys without their signatures "
            "(secagg.mode = malicious needs one per neighbour)"
        )
    identities = request.blobs(keys.SECAGG_PEER_IDENTITIES, len(peers))
    signatures = request.blobs(keys.SECAGG_PEER_SIGNATURES, len(peers))
    verified: dict[int, bytes] = {}
    for (peer, (cipher_pk, mask_pk)), who, signature in zip(
        peers.items(), identities, signatures, strict=True
    ):
        statement = identity.advertisement_statement(
            state.salt, peer, cipher_pk, mask_pk
        )
        if who not in policy.roster or who == own or who in verified.values():
            raise SiteRefusal(
                f"node {peer}'s key advertisement is signed by a key that is not "
                "another site of this site's roster (secagg-roster); refusing the "
                "round"
            )
        if not identity.verify(who, signature, statement):
            raise SiteRefusal(
                f"node {peer}'s public keys do not carry a valid signature of site "
                f"{policy.roster.name(who)!r}: the keys were substituted on the way; "
                "refusing the round"
            )
        verified[peer] = who
    return verified


@refusals_logged
def masked_update(
    context: Context,
    request: ConfigRecord,
    server_round: int,
    flat_delta: np.ndarray,
    num_examples: float,
    noise: np.ndarray | None = None,
    tail: np.ndarray | None = None,
    model_hash: bytes = b"",
    label_counts: np.ndarray | None = None,
    head: Mapping[str, np.ndarray] | None = None,
    noise_shares: int = 0,
) -> tuple[ArrayRecord, ConfigRecord]:
    """Stage 3: encode the delta with its weight, add the noise and the masks, once
    per round (the site records the masking in its state folder first).

    ``noise`` (``(P,) float64``, distributed DP) is added in the ring after the
    encoding has clipped the delta, so the clip cannot shrink it. It is this site's
    share for ``noise_shares`` (``m``) sites: the site refuses an ``m`` larger than
    the cohort it can see (:meth:`SitePolicy.check_noise_shares`) and, later,
    helps unmask only a sum of at least ``m`` survivors. ``tail`` (``(T,)
    float64``: adaptive clipping's unclipped bit, with its noise share) goes after
    the weight, neither clipped nor weighted.

    ``model_hash`` (:func:`received_model_hash`) is what the site signs in the
    consistency check of malicious mode.

    ``label_counts`` (``(L,)``, the site's rows per label) and ``head`` (its head
    delta, ``head.weight`` and ``head.bias``): ``aggregation = fedavg-per-label``'s
    per-label sums (:mod:`common.secagg.label_sums`), appended last, in the same
    fixed point, from the clipped delta.

    Returns the masked ``(P + 1 + T [+ L (d + 2)],) uint32`` upload and the senders whose shares
    failed authentication or their commitments (the coordinator drops them from the
    round; this site adds no pairwise mask with them).

    Raises
    ------
    SiteRefusal
        When the round falls below the site's floors, the site already masked an
        update for this round, or a field of the request is malformed.
    """
    inbox = CoordinatorRequest(request, "train")
    encoding = _round_encoding(inbox)
    if noise is not None:
        SitePolicy.from_node_config(context.node_config).check_noise_shares(
            noise_shares, inbox.integer(keys.SECAGG_COHORT, 0, MAX_CLIENTS, 0)
        )
    label_sums = None
    if label_counts is not None and head is not None:
        if encoding.ring_bits < RING_BITS:
            raise ValueError(
                "per-label sums need the 32- or 64-bit ring; the coordinator should "
                "have refused codec != fp32 with aggregation = fedavg-per-label"
            )
        label_sums = site_label_sums(
            head,
            label_counts,
            encoding.weight_of(num_examples),
            encoding.clip_factor(flat_delta),
        )  # (L * (d + 2),) float64
    if encoding.ring_bits < RING_BITS:
        if noise is not None:
            raise SiteRefusal(
                "distributed DP noise does not fit the 16-bit ring; the coordinator "
                "should have refused codec != fp32 with dp.mode = distributed"
            )
        # The narrow ring holds a rotated delta: (P',) with P' = P padded to blocks.
        flat_delta = rotate(flat_delta, inbox.blob(keys.SECAGG_ROTATION_SEED, 32))
    encoded = encoding.encode(flat_delta, num_examples)  # (P + 1,) in the ring
    if noise is not None:
        # Two's complement in the ring: negative steps wrap, as in the encoding.
        steps = np.rint(noise * encoding.scale).astype(np.int64).astype(encoding.ring)
        encoded[:-1] += steps
    if tail is not None:
        encoded = np.concatenate([encoded, encoding.to_ring(tail)])
    if label_sums is not None:
        encoded = np.concatenate([encoded, encoding.to_ring(label_sums)])
    return _masked(
        context,
        inbox,
        server_round,
        encoded,
        server_round,
        model_hash,
        noise_shares if noise is not None else 0,
    )


def _round_encoding(inbox: CoordinatorRequest) -> FixedPoint:
    """The round's fixed-point encoding as the coordinator announced it, each
    parameter checked: a ring the site knows, a finite clip and weight cap, and a
    scale at which one site's clipped update fits the ring (so no value the site
    encodes can wrap around or overflow the int64 on the way)."""
    ring_bits = inbox.integer(keys.SECAGG_RING_BITS, 1, WIDE_RING_BITS, RING_BITS)
    if ring_bits not in (NARROW_RING_BITS, RING_BITS, WIDE_RING_BITS):
        raise MalformedRequest(
            f"the coordinator's train message asks for a {ring_bits}-bit ring; this "
            f"site masks in {NARROW_RING_BITS}, {RING_BITS} or {WIDE_RING_BITS} bits"
        )
    clip = inbox.number(keys.SECAGG_CLIP, 0.0, 1e12)
    bound = inbox.number(keys.SECAGG_COORDINATE_BOUND, 0.0, 1e12, 0.0)
    top = 2.0 ** (ring_bits - 1)
    scale = inbox.number(keys.SECAGG_SCALE, 1.0, top)
    if clip <= 0 or scale * max(bound or clip, 1.0) > top:
        raise MalformedRequest(
            f"the coordinator's train message has secure-aggregation scale {scale:g} "
            f"and clip norm {clip:g}: one site's update would not fit the "
            f"{ring_bits}-bit ring; refusing it"
        )
    return FixedPoint(
        scale=scale,
        clip_norm=clip,
        max_weight=inbox.number(keys.SECAGG_MAX_WEIGHT, 1.0, 1e15),
        ring_bits=ring_bits,
        coordinate_bound=bound,
    )


@refusals_logged
def masked_totals(
    context: Context,
    request: ConfigRecord,
    server_round: int,
    totals: np.ndarray,
    model_hash: bytes = b"",
) -> tuple[ArrayRecord, ConfigRecord]:
    """Stage 3 of a secure evaluation: the site's evaluation totals ``(4,)
    float64`` (:class:`common.evaluation.EvalTotals`), encoded exactly
    (:mod:`common.secagg.totals`) and masked like an update."""
    encoded = encode_totals(totals, EVAL_FRACTIONAL)  # (4 * LIMBS,) uint32
    # Its own key stages, so its own masks: it claims the masking of an evaluation
    # (-(round + 1)), apart from the round's update.
    claim = -(server_round + 1)
    inbox = CoordinatorRequest(request, "evaluate")
    return _masked(context, inbox, server_round, encoded, claim, model_hash)


#: The masking a statistics round claims: training rounds claim their round (>= 1)
#: and evaluations -(round + 1), so 0 is free, and a run has one statistics round.
STATISTICS_CLAIM = 0


@refusals_logged
def masked_statistics(
    context: Context,
    request: ConfigRecord,
    server_round: int,
    values: np.ndarray,
    clip: float,
    max_rows: float,
    model_hash: bytes = b"",
) -> tuple[ArrayRecord, ConfigRecord]:
    """Stage 3 of the closed-form head's statistics round: the site's statistics
    ``(V,) float64`` (:meth:`common.closed_form.ClassStatistics.to_vector`) in the
    64-bit fixed point sized for the round's cohort, ``clip`` and ``max_rows``
    (:func:`common.closed_form.statistics_encoding`), masked like an update."""
    from common.closed_form import statistics_encoding

    inbox = CoordinatorRequest(request, "head statistics")
    # The encoding is the site's own, from the cohort it checks against its floors.
    cohort = inbox.integer(keys.SECAGG_COHORT, 1, MAX_CLIENTS)
    encoding = statistics_encoding(cohort, clip, max_rows)
    encoded = encoding.to_ring(values)  # (V,) uint64
    return _masked(context, inbox, server_round, encoded, STATISTICS_CLAIM, model_hash)


def _masked(
    context: Context,
    inbox: CoordinatorRequest,
    server_round: int,
    encoded: np.ndarray,
    claim: int,
    model_hash: bytes,
    noise_shares: int = 0,
) -> tuple[ArrayRecord, ConfigRecord]:
    """Check the site's floors, receive the neighbours' shares, claim the masking
    ``claim`` (once per run) and mask ``encoded`` (in the ring); the upload and the
    senders whose shares failed authentication or their commitments."""
    state = _load(context, server_round)
    live = inbox.node_ids(keys.SECAGG_PEERS)
    policy = SitePolicy.from_node_config(context.node_config)
    policy.check_neighbours(state.threshold, len(live))
    policy.check_cohort(inbox.integer(keys.SECAGG_COHORT, 0, MAX_CLIENTS, 0))
    senders = inbox.node_ids(keys.SECAGG_SENDERS)
    failed = state.receive_shares(
        dict(zip(senders, inbox.blobs(keys.SECAGG_SEALED, len(senders)), strict=True)),
        _sender_commitments(inbox, senders),
    )
    policy.claim_masking(context.run_id, context.node_id, claim)
    # No pairwise mask with a sender whose shares failed: the coordinator drops it,
    # and could not rebuild its half of that mask from shares nobody holds.
    masked = state.mask(encoded, [p for p in live if p not in failed])
    state.model_hash = model_hash
    state.noise_shares = noise_shares
    _save(context, state, server_round)
    return (
        to_array_record({"update": masked}),
        ConfigRecord({keys.SECAGG_BAD_SENDERS: [str(s) for s in failed]}),
    )


def received_model_hash(message: Message) -> bytes:
    """The digest of a training message's model and instructions (what every site
    of a round must have received alike)."""
    adapter = message.content.array_records[keys.ADAPTER_RECORD]
    instructions = message.content.config_records[keys.CONFIG_RECORD]
    return identity.model_digest(
        {name: array.data for name, array in adapter.items()}, dict(instructions)
    )


@refusals_logged
def consistency(message: Message, context: Context) -> Message:
    """Malicious mode, after the masked uploads: sign the survivor set the
    coordinator announces together with the hash of the model this site trained on.
    A site signs one survivor set per round."""
    request = CoordinatorRequest.of(message, keys.SECAGG_RECORD, "consistency")
    state = _current_round(context)
    survivors = sorted(request.node_ids(keys.SECAGG_SURVIVORS))
    policy = SitePolicy.from_node_config(context.node_config)
    if state.mode != MALICIOUS or policy.signing_key is None:
        raise SiteRefusal("a consistency check outside secagg.mode = malicious")
    if state.signed_survivors:
        raise SiteRefusal(
            "the coordinator asks this site to sign a second survivor set in one "
            "round; refusing"
        )
    if not state.model_hash:
        raise SiteRefusal("a consistency check before this site masked its update")
    if state.node not in survivors:
        raise SiteRefusal("the survivor set to sign leaves this site out")
    policy.check_cohort(len(survivors))
    state.signed_survivors = survivors
    _save(context, state, _state_round(context))
    statement = identity.consistency_statement(
        state.salt, state.node, survivors, state.model_hash
    )
    return _reply(
        message,
        ConfigRecord(
            {
                keys.SECAGG_IDENTITY: identity.public_raw(policy.signing_key),
                keys.SECAGG_SIGNATURE: policy.signing_key.sign(statement),
            }
        ),
    )


def _verify_consistency(
    policy: SitePolicy,
    state: ClientRound,
    request: CoordinatorRequest,
    survivors: list[int],
) -> None:
    """Every survivor, as a distinct site of the roster, signed the survivor set this
    site signed and the model hash this site trained on.

    Raises
    ------
    SiteRefusal
        Naming the first survivor whose signature is missing or fails: the
        coordinator told sites different survivor sets or sent them different
        models.
    """
    assert policy.roster is not None
    if survivors != state.signed_survivors:
        raise SiteRefusal(
            f"the coordinator now lists survivors {survivors}, not the set "
            f"{state.signed_survivors} this site signed; refusing to unmask"
        )
    signers = request.node_ids(keys.SECAGG_SIGNERS, [])
    signed = dict(
        zip(
            signers,
            zip(
                request.blobs(keys.SECAGG_SIGNER_IDENTITIES, len(signers), None, []),
                request.blobs(keys.SECAGG_SIGNATURES, len(signers), None, []),
                strict=True,
            ),
            strict=True,
        )
    )
    seen: set[bytes] = set()
    for node in survivors:
        who, signature = signed.get(node, (b"", b""))
        statement = identity.consistency_statement(
            state.salt, node, survivors, state.model_hash
        )
        known = state.identities.get(node, who)
        if who not in policy.roster or who in seen or who != known:
            raise SiteRefusal(
                f"survivor {node} has no signature from a distinct site of the "
                "roster; refusing to unmask"
            )
        if not identity.verify(who, signature, statement):
            raise SiteRefusal(
                f"survivor {node} ({policy.roster.name(who)!r}) signed another "
                "survivor set or another model hash than this site: the coordinator "
                "sent an inconsistent round; refusing to unmask"
            )
        seen.add(who)


@refusals_logged
def unmask(message: Message, context: Context) -> Message:
    """Stage 4: shares of survivors' seeds and dropped nodes' mask keys, never both,
    and only for a cohort of at least ``secagg-min-cohort`` (in malicious mode, one
    every survivor signed)."""
    request = CoordinatorRequest.of(message, keys.SECAGG_RECORD, "unmask")
    state = _current_round(context)
    survivors = sorted(request.node_ids(keys.SECAGG_SURVIVORS))
    policy = SitePolicy.from_node_config(context.node_config)
    policy.check_cohort(len(survivors))
    if state.mode == MALICIOUS:
        _verify_consistency(policy, state, request, survivors)
    policy.check_noise_survivors(state.noise_shares, len(survivors))
    dropped = request.node_ids(keys.SECAGG_DROPPED)
    seeds, mask_keys = state.unmask(survivors, dropped)
    del context.state[keys.SECAGG_STATE]  # this round's secrets are spent
    return _reply(
        message,
        ConfigRecord(
            {
                keys.SECAGG_SEED_OWNERS: [str(o) for o in seeds],
                keys.SECAGG_SEED_SHARES: [
                    crypto.share_to_bytes(v) for v in seeds.values()
                ],
                keys.SECAGG_KEY_OWNERS: [str(o) for o in mask_keys],
                keys.SECAGG_KEY_SHARES: [
                    crypto.share_to_bytes(v) for v in mask_keys.values()
                ],
            }
        ),
    )


def _state_round(context: Context) -> int:
    if keys.SECAGG_STATE not in context.state.config_records:
        raise ProtocolViolation(
            "no secure-aggregation state for this round: the key stages were skipped"
        )
    return int(context.state.config_records[keys.SECAGG_STATE]["round"])  # type: ignore[arg-type]


def _current_round(context: Context) -> ClientRound:
    return _load(context, _state_round(context))
