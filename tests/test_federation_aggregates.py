"""What a round applies, through the real strategy and plain summer: each codec's
aggregate against the float32 aggregate of the same deltas, and each server
optimiser's steps against steps computed by hand from the exact mean."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message

from common import keys
from common.codec import AdapterState, build_codec
from common.wire import from_array_record, to_array_record
from server.aggregation import build_rule
from tests.synthetic_sites import (
    NODES,
    replying_to,
    run_synthetic,
    site_app,
    synthetic_config,
    synthetic_grid,
)

#: A tensor large enough for int4's 128-value blocks and top-k's 5 %.
SHAPES = {"layer.lora_A.weight": (4, 96), "head.bias": (40,)}


def varied_delta(node: int) -> AdapterState:
    """Node ``node``'s seeded delta: normal values of scale 1e-2, a few larger."""
    rng = np.random.default_rng(node)
    return {
        name: (rng.normal(0, 1e-2, shape) * rng.choice([1, 5], shape)).astype(
            np.float32
        )
        for name, shape in SHAPES.items()
    }


def exact_mean() -> AdapterState:
    return {
        name: np.mean([varied_delta(n)[name] for n in NODES], axis=0) for name in SHAPES
    }


def run_with(codec: str, rule: str = "fedavg", rounds: int = 1):  # type: ignore[no-untyped-def]
    config = synthetic_config(
        **{"codec": codec, "aggregation": rule, "num-server-rounds": rounds}
    )
    app = site_app(varied_delta, codec=build_codec(codec, seed=7))
    reference = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    return run_synthetic(
        config,
        grid=synthetic_grid(app=app),
        rule=build_rule(config),
        initial=reference,
    )


def largest(name: str) -> float:
    """The largest magnitude any site sends in tensor ``name``."""
    return max(float(np.abs(varied_delta(n)[name]).max()) for n in NODES)


def block_largest(name: str) -> np.ndarray:
    """Per value, the largest magnitude in its 128-value int4 block at any site."""
    blocks = []
    for node in NODES:
        flat = np.abs(varied_delta(node)[name]).ravel()
        peaks = [flat[i : i + 128].max() for i in range(0, flat.size, 128)]
        blocks.append(np.repeat(peaks, 128)[: flat.size])
    return np.max(blocks, axis=0).reshape(SHAPES[name])


@pytest.mark.parametrize(
    ("codec", "bound"),
    [
        # round to nearest: half an ulp, 2^-11 (fp16) or 2^-8 (bf16) relative
        ("fp16", lambda name, mean: largest(name) * 2.0**-11 + 1e-9),
        ("bf16", lambda name, mean: largest(name) * 2.0**-8 + 1e-9),
        # stochastic rounding: under one step (max |x| / 127, or per block / 7)
        ("int8", lambda name, mean: np.full_like(mean, largest(name) / 127)),
        ("int4", lambda name, mean: block_largest(name) / 7),
    ],
)
def test_a_codecs_aggregate_is_the_fp32_aggregate_within_one_codec_step(
    codec: str, bound
) -> None:  # type: ignore[no-untyped-def]
    # Execute
    run, fp32 = run_with(codec), run_with("fp32")

    # Assert: fp32 applies the exact mean; every site's codec error is under the
    # bound, so the aggregate's distance from fp32's is too
    for name, mean in exact_mean().items():
        np.testing.assert_allclose(fp32.states[1][name], mean, rtol=1e-6, atol=1e-9)
        error = np.abs(run.states[1][name] - fp32.states[1][name])
        assert (error <= bound(name, mean) + 1e-8).all(), (codec, name, error.max())
        assert error.max() > 0, (codec, name)  # the codec did round


def test_topks_aggregate_is_the_mean_of_each_sites_largest_values() -> None:
    # Prepare: by hand, each site keeps its ceil(5 %) largest magnitudes per tensor
    def kept(node: int) -> AdapterState:
        out = {}
        for name, value in varied_delta(node).items():
            flat = value.ravel()
            keep = int(np.ceil(0.05 * flat.size))
            mask = np.zeros(flat.size, bool)
            mask[np.argsort(-np.abs(flat))[:keep]] = True
            out[name] = np.where(mask, flat, 0).reshape(value.shape)
        return out

    # Execute
    run = run_with("topk")

    # Assert
    for name in SHAPES:
        want = np.mean([kept(n)[name] for n in NODES], axis=0)
        np.testing.assert_allclose(run.states[1][name], want, atol=1e-9)


def hand_steps(rule: str, means: list[np.ndarray]) -> np.ndarray:
    """The global adapter after each mean, with the default server.* settings
    (fedavgm: lr 1, momentum 0.9; fedadam / fedyogi: lr 0.01, betas 0.9 / 0.99,
    tau 1e-3, no bias correction, v starting at tau^2)."""
    state = np.zeros_like(means[0], np.float64)
    m = np.zeros_like(state)
    v = np.full_like(state, 1e-3**2)
    for d in means:
        if rule == "fedavgm":
            m = 0.9 * m + d
            state = state + 1.0 * m
            continue
        m = 0.9 * m + 0.1 * d
        if rule == "fedadam":
            v = 0.99 * v + 0.01 * d**2
        else:
            v = v - 0.01 * d**2 * np.sign(v - d**2)
        state = state + 0.01 * m / (np.sqrt(v) + 1e-3)
    return state


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi"])
def test_a_server_optimiser_moves_the_global_adapter_by_the_hand_computed_steps(
    rule: str,
) -> None:
    # Execute: two rounds; every site sends the same delta each round
    run = run_with("fp32", rule, rounds=2)

    # Assert
    for name, mean in exact_mean().items():
        want = hand_steps(rule, [mean, mean])
        np.testing.assert_allclose(
            run.states[2][name], want, rtol=1e-5, atol=1e-7, err_msg=name
        )


def test_a_skipped_non_finite_round_leaves_the_optimisers_moments_untouched() -> None:
    # Prepare: in round 1 every site's delta is finite but their mean overflows
    # float32; round 2 is honest. No norm bound, so only the aggregate check acts.
    def overflow_once(sender: int, reply: Message) -> Message:
        if replying_to("train")(reply) and sender not in overflowed:
            overflowed.add(sender)
            record = reply.content.array_records[keys.ADAPTER_RECORD]
            huge = {
                k: np.full_like(v, 3e38) for k, v in from_array_record(record).items()
            }
            reply.content.array_records[keys.ADAPTER_RECORD] = to_array_record(huge)
        return reply

    overflowed: set[int] = set()
    config = synthetic_config(
        **{"aggregation": "fedadam", "train.max-update-norm": 0.0}
    )
    app = site_app(varied_delta)
    reference = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}

    # Execute
    run = run_synthetic(
        config,
        grid=synthetic_grid(tamper=overflow_once, app=app),
        rule=build_rule(config),
        initial=reference,
    )

    # Assert: round 1 changed nothing; round 2 is FedAdam's first step
    for name, mean in exact_mean().items():
        np.testing.assert_array_equal(run.states[1][name], reference[name])
        want = hand_steps("fedadam", [mean])
        np.testing.assert_allclose(run.states[2][name], want, rtol=1e-5, atol=1e-7)
