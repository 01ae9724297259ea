"""The client's SecAgg+ stage handlers.

The round's secrets (private keys, self-mask seed, shares held for neighbours) live in
the node's ``context.state``, which Flower keeps at the site between the messages of a
run; they never leave it except as the protocol's encrypted shares.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common import keys
from common.secagg import crypto
from common.secagg.encoding import RING_BITS, FixedPoint
from common.secagg.protocol import ClientRound, ProtocolViolation
from common.secagg.rotation import rotate
from common.wire import to_array_record, wire_bytes


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
        int(record["node"]), bytes(record["salt"]), int(record["threshold"])
    )  # type: ignore[arg-type]
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


def advertise(message: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs for this round; reply with the public halves."""
    request = message.content.config_records[keys.SECAGG_RECORD]
    server_round = int(request[keys.CFG_ROUND])  # type: ignore[arg-type]
    salt = crypto.round_salt(message.metadata.run_id, server_round)
    state = ClientRound(context.node_id, salt, int(request[keys.SECAGG_THRESHOLD]))  # type: ignore[arg-type]
    cipher_pk, mask_pk = state.advertise()
    _save(context, state, server_round)
    return _reply(
        message,
        ConfigRecord({keys.SECAGG_CIPHER_PK: cipher_pk, keys.SECAGG_MASK_PK: mask_pk}),
    )


def share_keys(message: Message, context: Context) -> Message:
    """Stage 2: secret-share the self-mask seed and the mask key among live
    neighbours."""
    request = message.content.config_records[keys.SECAGG_RECORD]
    server_round = int(request[keys.CFG_ROUND])  # type: ignore[arg-type]
    state = _load(context, server_round)
    peers = {
        peer: (bytes(c), bytes(m))
        for peer, c, m in zip(
            _ids(request[keys.SECAGG_PEERS]),
            request[keys.SECAGG_PEER_CIPHER_PKS],  # type: ignore[arg-type]
            request[keys.SECAGG_PEER_MASK_PKS],  # type: ignore[arg-type]
            strict=True,
        )
    }
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
    request: ConfigRecord, senders: list[int]
) -> dict[int, tuple[bytes, bytes]] | None:
    """Each sender's commitments to the (seed, key) shares it sent this site, when
    the coordinator relayed them."""
    if keys.SECAGG_SEED_COMMITMENTS not in request:
        return None
    pairs = zip(
        (wire_bytes(c, "commitment") for c in request[keys.SECAGG_SEED_COMMITMENTS]),  # type: ignore[union-attr]
        (wire_bytes(c, "commitment") for c in request[keys.SECAGG_KEY_COMMITMENTS]),  # type: ignore[union-attr]
        strict=True,
    )
    return dict(zip(senders, pairs, strict=True))


def masked_update(
    context: Context,
    request: ConfigRecord,
    server_round: int,
    flat_delta: np.ndarray,
    num_examples: float,
    noise: np.ndarray | None = None,
    tail: np.ndarray | None = None,
) -> tuple[ArrayRecord, ConfigRecord]:
    """Stage 3: encode the delta with its weight, add the noise and the masks.

    ``noise`` (``(P,) float64``, distributed DP) is added in the ring after the
    encoding has clipped the delta, so the clip cannot shrink it. ``tail`` (``(T,)
    float64``: adaptive clipping's unclipped bit, with its noise share) goes after
    the weight, neither clipped nor weighted.

    Returns the masked ``(P + 1 + T,) uint32`` upload and the senders whose shares
    failed authentication or their commitments (the coordinator drops them from the
    round; this site adds no pairwise mask with them).
    """
    state = _load(context, server_round)
    senders = _ids(request[keys.SECAGG_SENDERS])
    failed = state.receive_shares(
        dict(
            zip(senders, (bytes(b) for b in request[keys.SECAGG_SEALED]), strict=True)
        ),  # type: ignore[union-attr]
        _sender_commitments(request, senders),
    )
    encoding = FixedPoint(
        scale=float(request[keys.SECAGG_SCALE]),  # type: ignore[arg-type]
        clip_norm=float(request[keys.SECAGG_CLIP]),  # type: ignore[arg-type]
        max_weight=float(request[keys.SECAGG_MAX_WEIGHT]),  # type: ignore[arg-type]
        ring_bits=int(request.get(keys.SECAGG_RING_BITS, RING_BITS)),  # type: ignore[arg-type]
        coordinate_bound=float(request.get(keys.SECAGG_COORDINATE_BOUND, 0.0)),  # type: ignore[arg-type]
    )
    if encoding.ring_bits < RING_BITS:
        if noise is not None:
            raise ValueError(
                "distributed DP noise does not fit the 16-bit ring; the coordinator "
                "should have refused codec != fp32 with dp.mode = distributed"
            )
        # The narrow ring holds a rotated delta: (P',) with P' = P padded to blocks.
        seed = bytes(request[keys.SECAGG_ROTATION_SEED])  # type: ignore[arg-type]
        flat_delta = rotate(flat_delta, seed)
    encoded = encoding.encode(flat_delta, num_examples)  # (P + 1,) in the ring
    if noise is not None:
        # Two's complement in the ring: negative steps wrap, as in the encoding.
        steps = np.rint(noise * encoding.scale).astype(np.int64).astype(encoding.ring)
        encoded[:-1] += steps
    if tail is not None:
        encoded = np.concatenate([encoded, encoding.to_ring(tail)])
    # No pairwise mask with a sender whose shares failed: the coordinator drops it,
    # and could not rebuild its half of that mask from shares nobody holds.
    masked = state.mask(
        encoded, [p for p in _ids(request[keys.SECAGG_PEERS]) if p not in failed]
    )
    _save(context, state, server_round)
    return (
        to_array_record({"update": masked}),
        ConfigRecord({keys.SECAGG_BAD_SENDERS: [str(s) for s in failed]}),
    )


def unmask(message: Message, context: Context) -> Message:
    """Stage 4: shares of survivors' seeds and dropped nodes' mask keys, never both."""
    request = message.content.config_records[keys.SECAGG_RECORD]
    state = _load(
        context, int(context.state.config_records[keys.SECAGG_STATE]["round"])
    )  # type: ignore[arg-type]
    seeds, mask_keys = state.unmask(
        _ids(request[keys.SECAGG_SURVIVORS]), _ids(request[keys.SECAGG_DROPPED])
    )
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
