"""A malicious coordinator cannot unmask a site (issue 19, attacks A, B and C, and
the consistency attacks).

Each test runs the real coordinator and the real ClientApp in one process, with a
grid that rewrites the coordinator's outgoing messages the way a malicious
coordinator would send them: a lower threshold, fewer neighbours, a substituted
public key, a second training message, different survivor lists or different
models for different sites. The sites must refuse, say why in their log, and leave
the coordinator without an unmasked update.
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import app as client_app
from client.site_policy import SitePolicy, SiteRefusal
from common import dp, keys
from common.config import RunConfig
from common.secagg import crypto, identity
from common.secagg.protocol import MALICIOUS
from server.server_app import coordinate
from simulations import cli
from tests.conftest import InProcessGrid, write_jsonl

NODES = (101, 202, 303)
SITE_KEYS = ("site-a", "site-b", "site-c")
STAGES_TO_MASK = ("advertise", "share", "train")
Rewrite = Callable[[Message], list[Message]]


class MaliciousGrid(InProcessGrid):
    """The in-process grid with a coordinator that rewrites what it sends."""

    def __init__(self, node_configs: dict[int, dict], rewrite: Rewrite) -> None:  # type: ignore[type-arg]
        super().__init__(client_app, node_configs)
        self.rewrite = rewrite

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Deliver the rewritten messages instead of the coordinator's own."""
        sent = [changed for message in messages for changed in self.rewrite(message)]
        return super().send_and_receive(sent, timeout=timeout)


def honest(message: Message) -> list[Message]:
    """The coordinator's message, unchanged."""
    return [message]


def stage(message: Message) -> str:
    """``advertise``, ``share``, ``train``, ``consistency`` or ``unmask``."""
    kind = message.metadata.message_type
    return "train" if kind == "train" else kind.rsplit("_", 1)[-1]


def with_secagg(message: Message, **changes: object) -> Message:
    """A copy of ``message`` whose secure-aggregation record has ``changes``."""
    content = RecordDict(dict(message.content.items()))
    record = dict(content.config_records[keys.SECAGG_RECORD])
    record.update({k.replace("_", "-"): v for k, v in changes.items()})
    content[keys.SECAGG_RECORD] = ConfigRecord(record)  # type: ignore[arg-type]
    return Message(content, message.metadata.dst_node_id, message.metadata.message_type)


@pytest.fixture()
def site_data(tmp_path: Path) -> Path:
    rows = [
        {"text": f"{word} number {i} please", "label": label}
        for i in range(4)
        for word, label in (("send money", "send"), ("book flight", "flight"))
    ]
    return write_jsonl(tmp_path / "rows.jsonl", rows)


@pytest.fixture()
def roster(tmp_path: Path) -> dict[str, Path]:
    """Three sites' Ed25519 keys made with ``fedgraft site-keys`` and the roster of
    their public keys."""
    keys_dir, roster_file = tmp_path / "site-keys", tmp_path / "roster.txt"
    for name in SITE_KEYS:
        assert (
            cli.main(
                [
                    "site-keys",
                    name,
                    "--out",
                    str(keys_dir),
                    "--roster",
                    str(roster_file),
                ]
            )
            == 0
        )
    return {
        "roster": roster_file,
        **{name: keys_dir / f"{name}.ed25519" for name in SITE_KEYS},
    }


def test_site_keys_prints_a_roster_line_and_pasteable_node_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = cli.main(["site-keys", "clinic-1", "--out", str(tmp_path)])
    again = cli.main(["site-keys", "clinic-1", "--out", str(tmp_path)])

    # Assert: Flower parses --node-config as TOML; the key and roster load
    lines = capsys.readouterr().out.splitlines()
    node_config = tomllib.loads(lines[-1].replace('" ', '"\n'))
    (tmp_path / "roster.txt").write_text(lines[2] + "\n")
    policy = SitePolicy.from_node_config(node_config)
    assert code == 0 and again == 2, "an existing key is never overwritten"
    assert policy.roster is not None and policy.signing_key is not None
    assert identity.public_raw(policy.signing_key) in policy.roster
    assert (tmp_path / "clinic-1.ed25519").stat().st_mode & 0o777 == 0o600


def node_configs(
    tmp_path: Path, roster: dict[str, Path] | None, **floors: int
) -> dict[int, dict]:  # type: ignore[type-arg]
    configs = {}
    for i, node in enumerate(NODES):
        configs[node] = {
            **{f"secagg-{k.replace('_', '-')}": v for k, v in floors.items()},
            "partition-id": i,
            "num-partitions": len(NODES),
            "cache-dir": str(tmp_path / "cache"),
            "state-dir": str(tmp_path / f"state-{node}"),
        }
        if roster is not None:
            configs[node]["secagg-roster"] = str(roster["roster"])
            configs[node]["secagg-signing-key"] = str(roster[SITE_KEYS[i]])
    return configs


def run_round(
    backbone: Path,
    data: Path,
    output: Path,
    grid: MaliciousGrid,
    mode: str = MALICIOUS,
    **overrides: object,
) -> list[dict]:  # type: ignore[type-arg]
    config = RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(data),
            "data.partition": "iid",
            "sim.num-clients": len(NODES),
            "num-server-rounds": 1,
            "train.batch-size": 4,
            "train.max-steps": 1,
            "lora.dropout": 0.0,
            "output.dir": str(output),
            "secagg.enabled": True,
            "secagg.max-weight": 10.0,
            "secagg.mode": mode,
            **overrides,
        }
    )
    coordinate(grid, config)  # type: ignore[arg-type]
    return [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]


def errors(grid: InProcessGrid, kind: str) -> dict[int, str]:
    """Node -> error reason of the replies to ``kind`` messages."""
    return {
        reply.metadata.src_node_id: str(reply.error.reason)
        for reply in grid.received
        if reply.has_error() and stage(reply) == kind
    }


def masked_uploads(grid: InProcessGrid) -> list[Message]:
    """Replies that carry a masked update."""
    return [
        r
        for r in grid.received
        if not r.has_error() and keys.MASKED_RECORD in r.content.array_records
    ]


def unmasked(grid: InProcessGrid) -> list[Message]:
    """Unmask replies that carry shares (what an attacker needs)."""
    return [r for r in grid.received if stage(r) == "unmask" and not r.has_error()]


# ------------------------------------------------------------------ the honest run
def test_a_malicious_secure_round_with_a_roster_completes(
    tiny_backbone: Path, site_data: Path, tmp_path: Path, roster: dict[str, Path]
) -> None:
    # Prepare
    grid = MaliciousGrid(node_configs(tmp_path, roster), honest)

    # Execute
    rows = run_round(tiny_backbone, site_data, tmp_path / "out", grid)

    # Assert: every site signed its keys and the survivors, and the round counted all
    assert rows[1]["clients"] == len(NODES)
    assert {stage(m) for m in grid.sent} >= {"advertise", "share", "consistency"}
    advertised = [
        r.content.config_records[keys.SECAGG_RECORD]
        for r in grid.received
        if stage(r) == "advertise"
    ]
    assert all(len(bytes(r[keys.SECAGG_SIGNATURE])) == 64 for r in advertised)


# ------------------------------------------------- attack A: threshold, neighbours
@pytest.mark.parametrize(
    ("name", "attack", "refusal"),
    [
        (
            "threshold 1",
            lambda m: [with_secagg(m, threshold=1) if stage(m) == "advertise" else m],
            "below this site's secagg-min-threshold = 2",
        ),
        (
            "one neighbour",
            lambda m: [
                with_secagg(
                    m,
                    peers=m.content.config_records[keys.SECAGG_RECORD]["peers"][:1],
                    peer_cipher_pks=m.content.config_records[keys.SECAGG_RECORD][
                        "peer-cipher-pks"
                    ][:1],
                    peer_mask_pks=m.content.config_records[keys.SECAGG_RECORD][
                        "peer-mask-pks"
                    ][:1],
                )
                if stage(m) == "share"
                else m
            ],
            "below its secagg-min-neighbours = 2",
        ),
        (
            "cohort of 2",
            lambda m: [with_secagg(m, cohort=2) if stage(m) == "share" else m],
            "below this site's secagg-min-cohort = 3",
        ),
    ],
)
def test_sites_refuse_a_round_below_their_floors(
    name: str,
    attack: Rewrite,
    refusal: str,
    tiny_backbone: Path,
    site_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: honest-but-curious sites with the default floors
    grid = MaliciousGrid(node_configs(tmp_path, None), attack)

    # Execute
    with caplog.at_level(logging.ERROR, logger="client.secagg"):
        rows = run_round(
            tiny_backbone, site_data, tmp_path / "out", grid, "honest-but-curious"
        )

    # Assert: every site refused, logged why, and nothing was masked or unmasked
    refused = {**errors(grid, "advertise"), **errors(grid, "share")}
    assert set(refused) == set(NODES), name
    assert all(refusal in reason for reason in refused.values())
    assert caplog.text.count("refused by this site") == len(NODES)
    assert not masked_uploads(grid)
    assert not unmasked(grid) and rows[1]["clients"] == 0


def test_two_sites_with_default_floors_refuse_t_equal_1(
    tiny_backbone: Path, site_data: Path, tmp_path: Path
) -> None:
    """With two sampled sites the coordinator's defaults give k = 1 and t = 1."""
    # Prepare
    configs = node_configs(tmp_path, None)
    del configs[NODES[2]]
    grid = MaliciousGrid(configs, honest)

    # Execute
    run_round(tiny_backbone, site_data, tmp_path / "out", grid, "honest-but-curious")

    # Assert
    assert set(errors(grid, "advertise")) == set(NODES[:2])
    assert "threshold 1" in next(iter(errors(grid, "advertise").values()))


# -------------------------------------------------------- attack B: substituted key
def substitute_mask_key(
    victim: int, signer: identity.Ed25519PrivateKey | None
) -> Rewrite:
    """Replace, in ``victim``'s share request, its first neighbour's mask key with
    one the coordinator holds (re-signed with ``signer`` if given)."""
    attacker_key = crypto.public_bytes(crypto.new_private_key())

    def rewrite(message: Message) -> list[Message]:
        if stage(message) != "share" or message.metadata.dst_node_id != victim:
            return [message]
        record = message.content.config_records[keys.SECAGG_RECORD]
        masks = [bytes(k) for k in record[keys.SECAGG_PEER_MASK_PKS]]  # type: ignore[union-attr]
        masks[0] = attacker_key
        changes: dict[str, object] = {"peer_mask_pks": masks}
        if signer is not None:
            salt = crypto.round_salt(1, int(record[keys.CFG_ROUND]))  # type: ignore[arg-type]
            peer = int(record[keys.SECAGG_PEERS][0])  # type: ignore[index]
            cipher = bytes(record[keys.SECAGG_PEER_CIPHER_PKS][0])  # type: ignore[index]
            statement = identity.advertisement_statement(salt, peer, cipher, masks[0])
            identities = [bytes(i) for i in record[keys.SECAGG_PEER_IDENTITIES]]  # type: ignore[union-attr]
            signatures = [bytes(s) for s in record[keys.SECAGG_PEER_SIGNATURES]]  # type: ignore[union-attr]
            identities[0] = identity.public_raw(signer)
            signatures[0] = signer.sign(statement)
            changes.update(peer_identities=identities, peer_signatures=signatures)
        return [with_secagg(message, **changes)]

    return rewrite


@pytest.mark.parametrize(
    ("signer", "refusal"),
    [
        (None, "the keys were substituted on the way"),
        (
            identity.Ed25519PrivateKey.generate(),
            "not another site of this site's roster",
        ),
    ],
    ids=["signature-kept", "coordinator-signed"],
)
def test_a_substituted_public_key_is_refused(
    signer: identity.Ed25519PrivateKey | None,
    refusal: str,
    tiny_backbone: Path,
    site_data: Path,
    tmp_path: Path,
    roster: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    victim = NODES[0]
    grid = MaliciousGrid(
        node_configs(tmp_path, roster), substitute_mask_key(victim, signer)
    )

    # Execute
    with caplog.at_level(logging.ERROR, logger="client.secagg"):
        rows = run_round(tiny_backbone, site_data, tmp_path / "out", grid)

    # Assert: the victim never shared its secrets nor masked under the forged key
    assert refusal in errors(grid, "share")[victim]
    assert refusal in caplog.text
    assert victim not in {
        r.metadata.src_node_id for r in grid.received if stage(r) == "train"
    }
    assert rows[1]["clients"] < len(NODES)


# --------------------------------------------------- attack C: a second masking
def test_a_second_training_message_for_a_round_is_refused_also_after_a_restart(
    tiny_backbone: Path,
    site_data: Path,
    tmp_path: Path,
    roster: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the coordinator sends the victim its training message twice, the
    # second with lr ~ 0 (the difference of the two masked vectors is the delta)
    victim = NODES[1]

    def twice(message: Message) -> list[Message]:
        if stage(message) != "train" or message.metadata.dst_node_id != victim:
            return [message]
        content = RecordDict(dict(message.content.items()))
        instructions = dict(content.config_records[keys.CONFIG_RECORD])
        run_config = json.loads(str(instructions[keys.CFG_RUN_CONFIG]))
        instructions[keys.CFG_RUN_CONFIG] = json.dumps(
            {**run_config, "train.lr": 1e-12}
        )
        content[keys.CONFIG_RECORD] = ConfigRecord(instructions)  # type: ignore[arg-type]
        return [message, Message(content, victim, "train")]

    grid = MaliciousGrid(node_configs(tmp_path, roster), twice)

    # Execute: the run, then a SuperNode restart (fresh context, same state
    # folder) and the same round's messages replayed
    with caplog.at_level(logging.ERROR, logger="client.secagg"):
        run_round(tiny_backbone, site_data, tmp_path / "out", grid)
        first_refusal = errors(grid, "train").get(victim, "")
        grid.received.clear()
        old = grid.contexts[victim]
        grid.contexts[victim] = Context(
            run_id=old.run_id,
            node_id=victim,
            node_config=old.node_config,
            state=RecordDict(),
            run_config={},
        )
        sent = [m for m in grid.sent if m.metadata.dst_node_id == victim]
        replay = [next(m for m in sent if stage(m) == s) for s in STAGES_TO_MASK]
        InProcessGrid.send_and_receive(grid, replay)

    # Assert: both second maskings were refused, naming the round
    assert "already masked an update for round 1" in first_refusal
    after_restart = errors(grid, "train").get(victim, "")
    assert "already masked an update for round 1" in after_restart
    assert masked_uploads(grid) == []
    assert caplog.text.count("already masked") == 2


# ------------------------------------------- consistency: survivor sets and models
def different_survivors(target: int) -> Rewrite:
    """The overlapping-lists attack: ``target`` alive for its first neighbour (which
    returns its self-mask seed share) and dropped for the others (which return its
    mask key share)."""

    def rewrite(message: Message) -> list[Message]:
        if stage(message) not in ("consistency", "unmask"):
            return [message]
        record = message.content.config_records[keys.SECAGG_RECORD]
        survivors = [int(s) for s in record[keys.SECAGG_SURVIVORS]]  # type: ignore[union-attr]
        if message.metadata.dst_node_id in (target, min(set(NODES) - {target})):
            return [message]
        others = [str(s) for s in survivors if s != target]
        changes: dict[str, object] = {"survivors": others}
        if stage(message) == "unmask":
            changes["dropped"] = [str(target)]
        return [with_secagg(message, **changes)]

    return rewrite


def unmask_lists_only(target: int) -> Rewrite:
    """The same attack left to the unmask stage: everyone signed the full set."""
    inner = different_survivors(target)
    return lambda m: inner(m) if stage(m) == "unmask" else [m]


def different_model(target: int) -> Rewrite:
    """Pasquini et al. 2022: ``target`` trains on another model than its peers."""

    def rewrite(message: Message) -> list[Message]:
        if stage(message) != "train" or message.metadata.dst_node_id != target:
            return [message]
        content = RecordDict(dict(message.content.items()))
        adapter = content.array_records[keys.ADAPTER_RECORD]
        name = min(adapter)
        changed = {n: a.numpy() for n, a in adapter.items()}
        changed[name] = changed[name] + np.float32(0.5)
        content[keys.ADAPTER_RECORD] = ArrayRecord(
            {n: Array(np.ascontiguousarray(v)) for n, v in changed.items()}
        )
        return [Message(content, target, "train")]

    return rewrite


@pytest.mark.parametrize(
    ("attack", "refusal"),
    [
        (different_survivors, "another survivor set or another model hash"),
        (unmask_lists_only, "not the set"),
        (different_model, "another survivor set or another model hash"),
    ],
    ids=["two-survivor-sets", "contradictory-unmask-lists", "two-models"],
)
def test_an_inconsistent_round_is_refused_before_any_share_is_returned(
    attack: Callable[[int], Rewrite],
    refusal: str,
    tiny_backbone: Path,
    site_data: Path,
    tmp_path: Path,
    roster: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: floors that let a two-site set through, so that the signatures alone
    # must stop the attack
    target = NODES[2]
    grid = MaliciousGrid(node_configs(tmp_path, roster, min_cohort=2), attack(target))

    # Execute
    with caplog.at_level(logging.WARNING):
        rows = run_round(tiny_backbone, site_data, tmp_path / "out", grid)

    # Assert: the sites told apart refuse to unmask; the round is skipped
    refused = errors(grid, "unmask")
    assert refused and all(refusal in reason for reason in refused.values())
    assert refusal in caplog.text
    assert rows[1]["clients"] == 0
    owners = {
        int(o)
        for r in unmasked(grid)
        for o in r.content.config_records[keys.SECAGG_RECORD][keys.SECAGG_KEY_OWNERS]  # type: ignore[union-attr]
    }
    assert target not in owners, "nobody may hand out the target's mask key"


def test_a_site_with_a_roster_refuses_an_honest_but_curious_round(
    tiny_backbone: Path, site_data: Path, tmp_path: Path, roster: dict[str, Path]
) -> None:
    """A coordinator cannot downgrade a site that holds a roster."""
    # Prepare
    grid = MaliciousGrid(node_configs(tmp_path, roster), honest)

    # Execute
    run_round(tiny_backbone, site_data, tmp_path / "out", grid, "honest-but-curious")

    # Assert
    refused = errors(grid, "advertise")
    assert set(refused) == set(NODES)
    assert all("masks only in secagg.mode = malicious" in r for r in refused.values())


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"secagg-min-cohort": 0}, "secagg-min-cohort = 0 must be an integer >= 1"),
        (
            {"secagg-roster": "r.txt"},
            "secagg-roster and secagg-signing-key go together",
        ),
        (
            {"secagg-roster": "ROSTER", "secagg-signing-key": "KEY"},
            "ROSTER:2: not a roster line",
        ),
    ],
)
def test_a_bad_site_policy_names_the_node_config_key_or_roster_line(
    node_config: dict[str, object], message: str, tmp_path: Path
) -> None:
    # Prepare: a roster whose second line is garbled
    roster_file = tmp_path / "roster.txt"
    identity.write_site_keys("ok", tmp_path)
    roster_file.write_text((tmp_path / "ok.ed25519.pub").read_text() + "bad line x\n")
    paths = {"ROSTER": str(roster_file), "KEY": str(tmp_path / "ok.ed25519")}
    config = {k: paths.get(str(v), v) for k, v in node_config.items()}
    expected = message.replace("ROSTER", str(roster_file))

    # Execute / Assert
    with pytest.raises(
        (SiteRefusal, identity.IdentityError), match=re.escape(expected)
    ):
        SitePolicy.from_node_config(config)


# ------------------------------------- malformed fields: every one a clear refusal
def with_instructions(message: Message, **changes: object) -> Message:
    """A copy of ``message`` whose instructions record has ``changes``."""
    content = RecordDict(dict(message.content.items()))
    record = dict(content.config_records[keys.CONFIG_RECORD])
    record.update({k.replace("_", "-"): v for k, v in changes.items()})
    content[keys.CONFIG_RECORD] = ConfigRecord(record)  # type: ignore[arg-type]
    return Message(content, message.metadata.dst_node_id, message.metadata.message_type)


def crafted(at: str, **changes: object) -> Rewrite:
    """Send every ``at`` message with its secure-aggregation fields changed."""
    return lambda m: [with_secagg(m, **changes) if stage(m) == at else m]


def crafted_instructions(**changes: object) -> Rewrite:
    """Send every training message with its instructions changed."""
    return lambda m: [with_instructions(m, **changes) if stage(m) == "train" else m]


def replaced(at: str, field: str, value: object, first_only: bool = False) -> Rewrite:
    """Replace every entry (or the first) of the list ``field`` of every ``at``
    message (a record's list holds one type, so an attacker replaces them all)."""

    def rewrite(message: Message) -> list[Message]:
        if stage(message) != at:
            return [message]
        record = message.content.config_records[keys.SECAGG_RECORD]
        entries = list(record[field])  # type: ignore[arg-type]
        new = [value, *entries[1:]] if first_only else [value] * len(entries)
        return [with_secagg(message, **{field: new})]

    return rewrite


# A crafted integer where bytes belong used to reach bytes(n): MemoryError for
# 2**62, OverflowError for 2**63, n zero bytes for anything smaller.
MALFORMED_FIELDS = {
    "huge threshold": (
        crafted("advertise", threshold=2**62),
        "advertise",
        "'threshold' must be in [1, 1048576], got 4611686018427387904",
    ),
    "threshold as text": (
        crafted("advertise", threshold="2"),
        "advertise",
        "'threshold' must be an integer, got '2'",
    ),
    "negative round": (
        crafted("advertise", server_round=-1),
        "advertise",
        "'server-round' must be in [0, 2147483647], got -1",
    ),
    "integer as a mask key": (
        replaced("share", "peer-mask-pks", 2**62),
        "share",
        "'peer-mask-pks'[0] must be bytes, got 4611686018427387904",
    ),
    "negative integer as a cipher key": (
        replaced("share", "peer-cipher-pks", -1),
        "share",
        "'peer-cipher-pks'[0] must be bytes, got -1",
    ),
    "peers as a text of digits": (
        crafted("share", peers="101202"),
        "share",
        "'peers' must be a list, got '101202'",
    ),
    "negative node id": (
        replaced("share", "peers", "-5", first_only=True),
        "share",
        "'peers'[0] must be a node id in decimal, got '-5'",
    ),
    "node id beyond 64 bits": (
        replaced("share", "peers", str(2**64), first_only=True),
        "share",
        "'peers'[0] must be in [0, 18446744073709551615], got a 65-bit integer",
    ),
    "fewer keys than peers": (
        lambda m: [
            with_secagg(
                m,
                peer_mask_pks=m.content.config_records[keys.SECAGG_RECORD][
                    "peer-mask-pks"
                ][:1],
            )
            if stage(m) == "share"
            else m
        ],
        "share",
        "'peer-mask-pks' holds 1 entries for 2 node(s)",
    ),
    "cohort as a float": (
        crafted("share", cohort=1e300),
        "share",
        "'cohort' must be an integer, got 1e+300",
    ),
    "integer as a sealed share": (
        replaced("train", "sealed", 2**63 - 1),
        "train",
        "'sealed'[0] must be bytes, got 9223372036854775807",
    ),
    "senders listed twice": (
        replaced("train", "senders", str(NODES[0])),
        "train",
        "'senders' lists node",
    ),
    "NaN scale": (
        crafted("train", scale=float("nan")),
        "train",
        "'scale' must be a finite number",
    ),
    "unknown ring": (
        crafted("train", ring_bits=128),
        "train",
        "'ring-bits' must be in [1, 64], got 128",
    ),
    "scale past the ring": (
        crafted("train", scale=2.0**31),
        "train",
        "one site's update would not fit the 32-bit ring",
    ),
    "huge m": (
        crafted_instructions(expected_clients=2**40),
        "train",
        "'expected-clients' must be in [0, 1048576], got 1099511627776",
    ),
    "survivor beyond 64 bits": (
        crafted("unmask", survivors=[str(n) for n in NODES] + ["9" * 30]),
        "unmask",
        "must be a node id in decimal",
    ),
    "dropped as an integer": (
        crafted("unmask", dropped=12),
        "unmask",
        "'dropped' must be a list, got 12",
    ),
}


@pytest.mark.parametrize(
    ("attack", "at", "refusal"),
    list(MALFORMED_FIELDS.values()),
    ids=list(MALFORMED_FIELDS),
)
def test_a_malformed_field_from_the_coordinator_is_refused_naming_it(
    attack: Rewrite,
    at: str,
    refusal: str,
    tiny_backbone: Path,
    site_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    grid = MaliciousGrid(node_configs(tmp_path, None), attack)

    # Execute
    with caplog.at_level(logging.ERROR):
        rows = run_round(
            tiny_backbone, site_data, tmp_path / "out", grid, "honest-but-curious"
        )

    # Assert: every site refused that stage with a MalformedRequest naming the
    # field (no OverflowError, MemoryError, TypeError), logged it, and the
    # coordinator finished the run without a sum
    refused = errors(grid, at)
    assert set(refused) == set(NODES)
    assert all(r.startswith("MalformedRequest: ") for r in refused.values()), refused
    assert all(refusal in r for r in refused.values()), refused
    assert caplog.text.count("refused by this site") >= len(NODES)
    assert rows[1]["clients"] == 0 and not unmasked(grid)


def test_a_malformed_signature_list_in_the_consistency_stage_is_refused(
    tiny_backbone: Path,
    site_data: Path,
    tmp_path: Path,
    roster: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: malicious mode; the unmask request's signatures are integers
    def attack(message: Message) -> list[Message]:
        if stage(message) != "unmask":
            return [message]
        record = message.content.config_records[keys.SECAGG_RECORD]
        count = len(record[keys.SECAGG_SIGNATURES])  # type: ignore[arg-type]
        return [with_secagg(message, signatures=[2**62] * count)]

    grid = MaliciousGrid(node_configs(tmp_path, roster), attack)

    # Execute
    with caplog.at_level(logging.ERROR, logger="client.secagg"):
        rows = run_round(tiny_backbone, site_data, tmp_path / "out", grid)

    # Assert
    refused = errors(grid, "unmask")
    assert set(refused) == set(NODES)
    assert all("'signatures'[0] must be bytes" in r for r in refused.values())
    assert "refused by this site" in caplog.text
    assert rows[1]["clients"] == 0


# ------------------------------------------ distributed DP: the m of the noise shares
DISTRIBUTED_DP = {
    "dp.enabled": True,
    "dp.mode": "distributed",
    "dp.noise-multiplier": 0.01,
    "dp.clip-norm": 1.0,
}


def inflated_m(m: int, cohort: int | None = None) -> Rewrite:
    """Tell every site to add 1/m of the noise (and, if given, announce ``cohort``
    in the masked-input stage to match)."""

    def rewrite(message: Message) -> list[Message]:
        if stage(message) != "train":
            return [message]
        changed = with_instructions(message, expected_clients=m)
        return [changed if cohort is None else with_secagg(changed, cohort=cohort)]

    return rewrite


@pytest.mark.parametrize(
    ("with_roster", "attack", "refusal"),
    [
        (False, inflated_m(30), "announces a cohort of 3: fewer than m = 30"),
        (True, inflated_m(30, cohort=30), "its roster (secagg-roster) lists only 3"),
    ],
    ids=["m-above-the-cohort", "m-and-cohort-above-the-roster"],
)
def test_sites_refuse_to_add_noise_for_an_inflated_m(
    with_roster: bool,
    attack: Rewrite,
    refusal: str,
    tiny_backbone: Path,
    site_data: Path,
    tmp_path: Path,
    roster: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each site adds N(0, (sigma C)^2 / m): a coordinator that says m = 30 to a
    cohort of 3 would get a sum with a tenth of the noise variance."""
    # Prepare
    configs = node_configs(tmp_path, roster if with_roster else None)
    grid = MaliciousGrid(configs, attack)
    mode = MALICIOUS if with_roster else "honest-but-curious"

    # Execute
    with caplog.at_level(logging.ERROR, logger="client.secagg"):
        rows = run_round(
            tiny_backbone, site_data, tmp_path / "out", grid, mode, **DISTRIBUTED_DP
        )

    # Assert: no site masked an update with the small noise share
    refused = errors(grid, "train")
    assert set(refused) == set(NODES)
    assert all(refusal in r for r in refused.values()), refused
    assert refusal in caplog.text
    assert not masked_uploads(grid) and rows[1]["clients"] == 0


def test_sites_refuse_to_unmask_a_sum_with_fewer_noise_shares_than_m(
    tiny_backbone: Path,
    site_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """m = 3 sites each add a third of the noise; one masked upload never arrives,
    so a sum of the other two would carry two thirds of it."""
    # Prepare: floors that let a two-site sum through, so the m check must stop it
    lost = NODES[2]
    grid = MaliciousGrid(node_configs(tmp_path, None, min_cohort=2), honest)
    grid.tamper = lambda node, reply: (
        None if node == lost and stage(reply) == "train" else reply
    )

    # Execute
    with caplog.at_level(logging.ERROR, logger="client.secagg"):
        rows = run_round(
            tiny_backbone,
            site_data,
            tmp_path / "out",
            grid,
            "honest-but-curious",
            **DISTRIBUTED_DP,
        )

    # Assert
    refused = errors(grid, "unmask")
    assert set(refused) == set(NODES) - {lost}
    assert all(
        "holds only 2 survivors' shares" in r for r in refused.values()
    ), refused
    assert not unmasked(grid) and rows[1]["clients"] == 0


def test_m_counts_the_sites_that_passed_the_key_stages(
    tiny_backbone: Path,
    site_data: Path,
    tmp_path: Path,
) -> None:
    """A sampled site that fails the key stages adds no noise: the others are told
    m = 3, not the 4 sampled, and the round completes with the full noise."""
    # Prepare: a fourth site whose key advertisement is lost
    configs = node_configs(tmp_path, None)
    configs[404] = {**configs[NODES[0]], "state-dir": str(tmp_path / "state-404")}
    grid = MaliciousGrid(configs, honest)
    grid.tamper = lambda node, reply: (
        None if node == 404 and stage(reply) == "advertise" else reply
    )

    # Execute
    rows = run_round(
        tiny_backbone,
        site_data,
        tmp_path / "out",
        grid,
        "honest-but-curious",
        **DISTRIBUTED_DP,
    )

    # Assert
    told = {
        m.content.config_records[keys.CONFIG_RECORD][keys.CFG_EXPECTED_CLIENTS]
        for m in grid.sent
        if stage(m) == "train"
    }
    assert told == {len(NODES)}
    assert rows[1]["clients"] == len(NODES)
    assert rows[1][dp.NOISE_SHORTFALL] == 0.0
