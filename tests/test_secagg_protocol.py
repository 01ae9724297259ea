"""SecAgg+ building blocks and the two state machines, without Flower."""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg import crypto
from common.secagg.encoding import FixedPoint, HeadroomError
from common.secagg.masking import prg
from common.secagg.protocol import (
    ClientRound,
    CoordinatorRound,
    ProtocolViolation,
    default_neighbours,
    default_threshold,
    neighbour_graph,
)

SALT = crypto.round_salt(7, 1)


def test_any_threshold_of_shares_rebuilds_the_secret_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = crypto.share_secret(secret, 3, [0, 1, 2, 3, 4])
    assert crypto.recover_secret({k: shares[k] for k in (4, 1, 2)}, 3) == secret
    with pytest.raises(crypto.SecAggCryptoError, match="2 shares cannot rebuild"):
        crypto.recover_secret({k: shares[k] for k in (0, 1)}, 3)


def test_a_tampered_ciphertext_fails_authentication() -> None:
    key = bytes(32)
    sealed = bytearray(crypto.encrypt(key, b"share", b"ad"))
    sealed[-1] ^= 1
    with pytest.raises(crypto.SecAggCryptoError, match="authentication"):
        crypto.decrypt(key, bytes(sealed), b"ad")


def test_both_peers_derive_the_same_pairwise_key_and_other_rounds_differ() -> None:
    a, b = crypto.new_private_key(), crypto.new_private_key()
    ab = crypto.agree(a, crypto.public_bytes(b), SALT, b"m")
    assert ab == crypto.agree(b, crypto.public_bytes(a), SALT, b"m")
    assert ab != crypto.agree(a, crypto.public_bytes(b), crypto.round_salt(7, 2), b"m")


def test_the_prg_is_deterministic_per_seed_and_uniform_looking() -> None:
    first, again = prg(b"k" * 32, 100_000), prg(b"k" * 32, 100_000)
    assert np.array_equal(first, again) and not np.array_equal(
        first, prg(b"j" * 32, 100_000)
    )
    assert abs(first.astype(np.float64).mean() / 2**32 - 0.5) < 0.01


@pytest.mark.parametrize("count", [3, 4, 10, 11, 50])
def test_the_neighbour_graph_is_symmetric_and_k_regular(count: int) -> None:
    nodes = list(range(100, 100 + count))
    k = default_neighbours(count)
    graph = neighbour_graph(nodes, k, seed=1)
    assert all(node in graph[peer] for node, peers in graph.items() for peer in peers)
    assert {len(peers) for peers in graph.values()} == {k}
    assert default_threshold(k) > k / 2


def test_the_fixed_point_encoding_refuses_a_ring_too_small_for_the_clients() -> None:
    with pytest.raises(
        HeadroomError, match="lower secagg.clip-norm or sample fewer clients"
    ):
        FixedPoint.for_clients(num_clients=100_000, clip_norm=1000.0, max_weight=100.0)


def test_encoding_refuses_nan() -> None:
    encoding = FixedPoint.for_clients(3, 1.0, 100.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        encoding.encode(np.array([0.1, np.nan], np.float32), 10)


def run_protocol(
    inputs: dict[int, np.ndarray],
    drop_after: dict[int, str] | None = None,
    neighbours: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Drive all four stages in memory; ``drop_after[node]`` names the stage it
    misses."""
    drop_after = drop_after or {}
    nodes = sorted(inputs)
    k = neighbours or default_neighbours(len(nodes))
    t = default_threshold(k)
    server = CoordinatorRound(neighbour_graph(nodes, k, seed=3), t, SALT)
    clients = {n: ClientRound(n, SALT, t) for n in nodes}
    advertised = {
        n: clients[n].advertise() for n in nodes if drop_after.get(n) != "setup"
    }
    server.accept_keys(advertised)
    live = server.prune(server.public_keys)
    sealed: dict[int, dict[int, bytes]] = {}
    for n in live:
        if drop_after.get(n) == "share":
            continue
        peers = {p: server.public_keys[p] for p in server.live_neighbours(n, live)}
        sealed[n] = clients[n].share_keys(peers)
    shared = server.prune(sealed)
    masked = {}
    for n in shared:
        if drop_after.get(n) == "mask":
            continue
        inbox = {
            sender: blobs[n]
            for sender, blobs in sealed.items()
            if n in blobs and sender in shared
        }
        clients[n].receive_shares(inbox)
        masked[n] = clients[n].mask(inputs[n], server.live_neighbours(n, shared))
    survivors = sorted(masked)
    dropped = sorted(set(shared) - set(survivors))
    seed_shares: dict[int, dict[int, int]] = {}
    key_shares: dict[int, dict[int, int]] = {}
    for n in survivors:
        if drop_after.get(n) == "unmask":
            continue
        seeds, keys = clients[n].unmask(survivors, dropped)
        for owner, share in seeds.items():
            seed_shares.setdefault(owner, {})[n] = share
        for owner, share in keys.items():
            key_shares.setdefault(owner, {})[n] = share
    return server.unmask(masked, shared, seed_shares, key_shares), survivors


def integer_inputs(count: int, length: int = 257) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        1000 + i: rng.integers(0, 2**32, size=length, dtype=np.uint64).astype(np.uint32)
        for i in range(count)
    }


def ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        total += vector
    return total


def test_without_dropouts_the_unmasked_sum_is_bit_exact() -> None:
    inputs = integer_inputs(10)
    total, survivors = run_protocol(inputs)
    assert survivors == sorted(inputs)
    assert np.array_equal(total, ring_sum(list(inputs.values())))


@pytest.mark.parametrize("stage", ["setup", "share", "mask", "unmask"])
def test_unmask_recovers_the_survivors_sum_with_one_dropout_at_each_stage(
    stage: str,
) -> None:
    # Prepare
    inputs = integer_inputs(10)
    dropout = 1004

    # Execute
    total, survivors = run_protocol(inputs, drop_after={dropout: stage})

    # Assert: a node that dropped at unmask still sent its input, so it is in the sum
    expected = [inputs[n] for n in survivors]
    assert (dropout in survivors) == (stage == "unmask")
    assert np.array_equal(total, ring_sum(expected))


def test_too_many_dropouts_around_a_node_make_unmasking_fail_loudly() -> None:
    inputs = integer_inputs(5)
    with pytest.raises(ProtocolViolation, match="cannot rebuild"):
        run_protocol(
            inputs, drop_after={n: "unmask" for n in list(inputs)[:3]}, neighbours=4
        )


def test_a_client_refuses_a_coordinator_that_lists_a_node_as_alive_and_dropped() -> (
    None
):
    client = ClientRound(1, SALT, 2)
    client.advertise()
    peers = {n: ClientRound(n, SALT, 2).advertise() for n in (2, 3, 4)}
    client.share_keys(peers)
    with pytest.raises(
        ProtocolViolation, match=r"node\(s\) \[3\] as both alive and dropped"
    ):
        client.unmask(survivors=[1, 2, 3], dropped=[3])


def test_a_client_refuses_a_duplicate_public_key() -> None:
    client = ClientRound(1, SALT, 2)
    client.advertise()
    shared_key = ClientRound(9, SALT, 2).advertise()
    with pytest.raises(ProtocolViolation, match="reuses a public key"):
        client.share_keys({2: shared_key, 3: shared_key})


def test_the_coordinator_refuses_malformed_and_duplicate_keys() -> None:
    server = CoordinatorRound({}, 2, SALT)
    good = ClientRound(1, SALT, 2).advertise()
    twin = ClientRound(2, SALT, 2).advertise()
    refused = server.accept_keys({1: good, 2: twin, 3: twin, 4: (b"short", twin[1])})
    assert refused == [2, 3, 4] and list(server.public_keys) == [1]


def test_secure_mean_matches_the_float_mean_within_the_quantisation_error() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    deltas = [rng.normal(scale=0.01, size=500).astype(np.float32) for _ in range(8)]
    weights = [100, 250, 40, 77, 300, 12, 90, 60]
    encoding = FixedPoint.for_clients(len(deltas), clip_norm=10.0, max_weight=1000.0)
    inputs = {
        2000 + i: encoding.encode(d, w)
        for i, (d, w) in enumerate(zip(deltas, weights, strict=True))
    }

    # Execute
    total, _ = run_protocol(inputs)
    weighted_sum, weight = encoding.decode_sum(total)

    # Assert: each client's rounding is at most half a step, so the sum is off by at
    # most n/2 steps
    step = 1 / encoding.scale
    exact = sum(
        w / 1000.0 * d.astype(np.float64) for d, w in zip(deltas, weights, strict=True)
    )
    assert np.abs(weighted_sum - exact).max() <= len(deltas) * step / 2
    assert weight == pytest.approx(sum(weights) / 1000.0, abs=len(deltas) * step)
