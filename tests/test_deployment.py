"""A real deployment on loopback: a SuperLink, two SuperNodes with their own data files,
and ``flwr run`` submitting the app, as data-owning sites would run it."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.demo import demo_test_examples, demo_train_examples
from simulations import cli
from tests.conftest import REPO_ROOT, build_tiny_backbone, flower_env, write_jsonl
from tests.loopback_ports import PortLease

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


def wait_until(
    check: callable,  # type: ignore[valid-type]
    timeout: float,
    what: str,
    interval: float = 0.5,
) -> None:
    """Poll ``check`` every ``interval`` seconds until it is true, or fail naming
    ``what``. Checks that start a ``flwr`` CLI process cost about a second of CPU
    each: poll those slowly so they do not starve the run on two cores."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def healthy(port: int) -> bool:
    """True when a Flower process answers /health on ``port``."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/health", timeout=1
        ) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def serving(process: subprocess.Popen[bytes], port: int) -> Callable[[], bool]:
    """A check for :func:`wait_until`: ``process`` answers /health on ``port``; it
    fails at once, rather than at the deadline, when the process has exited."""

    def check() -> bool:
        if process.poll() is not None:
            pytest.fail(
                f"{Path(str(process.args[0])).name} exited with code "
                f"{process.returncode} before serving port {port} (its log follows)"
            )
        return healthy(port)

    return check


class Processes:
    """Subprocesses started by a test, all stopped at the end, and the loopback
    ports leased for them (tests.loopback_ports), given back after the stop."""

    def __init__(self, env: dict[str, str], logs: Path, ports: PortLease) -> None:
        self.env = env
        self.logs = logs
        self.ports = ports
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """Stop ``process`` (and its children) with SIGTERM, SIGKILL after 15 s."""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            self.stop(process)
        self.ports.release()


@pytest.fixture()
def deployment(tmp_path: Path) -> Iterator[tuple[Processes, dict[str, str], int]]:
    """Environment for Flower processes with a private FLWR_HOME and ports."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    ports = PortLease()
    port = ports.take()
    env = flower_env(
        home,
        '[superlink]\ndefault = "deploy"\n\n'
        f'[superlink.deploy]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = Processes(env, logs, ports)
    try:
        yield processes, env, port
    finally:
        processes.stop_all()
        for log in sorted(logs.glob("*.log")):
            sys.stderr.write(
                f"--- {log.name} (last 3000 bytes)\n"
                f"{log.read_bytes()[-3000:].decode(errors='replace')}\n"
            )


# Every message starts a fresh flwr-clientapp process on a SuperNode, so each round
# costs seconds. One run covers two sites, malicious-secure aggregation (signed keys,
# a roster and floors at each site, the consistency round) across processes, a
# coordinator that holds only the label map while the sites evaluate on their own rows
# (secure totals), and rounds that find the backbone already handed over; a submission
# without a label map is refused before any site sees it; a short run shows a site
# refusing a key its roster does not vouch for, and a last one a site, restarted with
# its default threshold floor, refusing the coordinator's too-low threshold. Plain aggregation across
# processes runs in tests/test_secure_deployment.py (TLS and node authentication).
def test_two_sites_train_secure_rounds_over_a_loopback_deployment(
    deployment: tuple[Processes, dict[str, str], int],
    tmp_path: Path,
) -> None:
    rounds = 2
    # Prepare: a tiny backbone only the coordinator has, two sites with their own rows
    processes, env, port = deployment
    backbone = build_tiny_backbone(tmp_path / "backbone")
    rows = [
        e
        for e in demo_train_examples(seed=3)
        if e.extra["domain"] in ("banking", "travel")
    ]
    tests = demo_test_examples(seed=3)
    sites, site_tests, test_rows = [], [], []
    for index, domain in enumerate(("banking", "travel")):
        site_rows = [
            {"text": e.text, "label": e.label}
            for e in rows
            if e.extra["domain"] == domain
        ][:24]
        sites.append(write_jsonl(tmp_path / f"site{index}.jsonl", site_rows))
        own_tests = [
            {"text": e.text, "label": e.label}
            for e in tests
            if e.extra["domain"] == domain
        ]
        site_tests.append(write_jsonl(tmp_path / f"site{index}-test.jsonl", own_tests))
        test_rows += own_tests
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text(
        "".join(f"{x}\n" for x in sorted({r["label"] for r in test_rows}))
    )
    rosters = site_keys(tmp_path / "site-keys", len(sites))
    superlink = processes.start(
        "superlink",
        str(BIN / "flower-superlink"),
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(tmp_path / "state.db"),
        "--disable-runtime-dependency-installation",
    )
    wait_until(serving(superlink, port), 60, "the SuperLink")

    def start_site(
        index: int, log_name: str, min_threshold: int = 1
    ) -> subprocess.Popen[bytes]:
        """Site ``index``'s SuperNode. Two sites: each knowingly lowers its
        secure-aggregation floors (the defaults refuse a round of fewer than three
        clients); ``min_threshold`` is its secagg-min-threshold."""
        node_port = processes.ports.take()
        key = tmp_path / "site-keys" / f"site{index}.ed25519"
        node_config = (
            f'data-path="{sites[index]}" eval-path="{site_tests[index]}" '
            f'cache-dir="{tmp_path / f"cache{index}"}" '
            f'secagg-roster="{rosters[index]}" secagg-signing-key="{key}" '
            f"secagg-min-threshold={min_threshold} secagg-min-neighbours=1 "
            "secagg-min-cohort=2"
        )
        process = processes.start(
            log_name,
            str(BIN / "flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(node_port),
            "--node-config",
            node_config,
        )
        wait_until(serving(process, node_port), 60, f"SuperNode {log_name}")
        return process

    supernodes = [start_site(i, f"supernode{i}") for i in range(len(sites))]

    def online_nodes() -> int:
        listing = subprocess.run(
            [str(BIN / "flwr"), "supernode", "ls", "deploy", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
        )
        return listing.stdout.count('"online"')

    wait_until(lambda: online_nodes() == 2, 90, "two SuperNodes online", interval=2.0)

    def submit_run(
        rounds: int, output: Path, *, labels: bool = True
    ) -> tuple[int, str]:
        """Submit the app as an operator would; the run id and its final status.
        The coordinator holds no rows: only the label map (unless ``labels`` is
        false), so the sites evaluate (on their ``eval-path`` rows)."""
        overrides = (
            f'num-server-rounds={rounds} model.name="{backbone}" '
            + (f'data.labels="{labels_file}" ' if labels else "")
            + f'output.dir="{output}" train.min-clients=2 train.batch-size=8 '
            "train.timeout=300.0 secagg.timeout=300.0 eval.every=2 "
            'secagg.enabled=true secagg.max-weight=24.0 secagg.mode="malicious"'
        )
        run_id = submit(env, overrides)
        return run_id, wait_for_run(env, run_id)

    def run(rounds: int, output: Path) -> list[dict[str, object]]:
        """A run that must complete; its metrics lines."""
        _, status = submit_run(rounds, output)
        assert status == "finished:completed", status
        lines = (output / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    # Execute: a malicious-secure run with every site's roster intact
    output = tmp_path / "run-output"
    metrics = run(rounds, output)

    # Assert: the run completed, both sites trained in both rounds, outputs are written
    assert [row["round"] for row in metrics] == list(range(rounds + 1))
    assert [row["clients"] for row in metrics[1:]] == [2] * rounds
    assert metrics[0]["bytes_backbone"] > 0, (
        "sites without the backbone should have received it (to evaluate round 0)"
    )
    assert all(row["bytes_backbone"] == 0 for row in metrics[1:]), "handed over once"
    assert (output / "merged" / "head.safetensors").exists()
    assert any((tmp_path / "cache0" / "backbones").iterdir())
    # Assert: the sites evaluated (securely: totals only) in rounds 0 and 2 on exactly
    # their own test rows, and those are the run's figures (issue 17)
    evaluated = [metrics[0], metrics[2]]
    assert [row["sites_eval_examples"] for row in evaluated] == [len(test_rows)] * 2
    assert all(row["sites_evaluated"] == 2 for row in evaluated)
    assert all(row["eval_accuracy"] == row["sites_eval_accuracy"] for row in evaluated)
    assert metrics[1]["eval_accuracy"] is None, "eval.every = 2 skips round 1"

    # Execute: the same coordinator without any label map
    refused_id, refused_status = submit_run(
        1, tmp_path / "no-labels-output", labels=False
    )

    # Assert: refused at start-up naming the key, before any site saw the run
    assert refused_status.startswith("finished:failed"), refused_status
    assert "data.labels" in refused_status, refused_status
    for index in range(len(sites)):
        site_log = (processes.logs / f"supernode{index}.log").read_text(
            errors="replace"
        )
        assert f"[RUN {refused_id}]" not in site_log, f"site {index} was contacted"

    # Execute: site 1's roster entry for site 0 no longer matches the key site 0
    # signs with, which is what site 1 sees when a coordinator substitutes a key
    entry = rosters[1].read_text().splitlines()
    name, key = entry[0].split()
    flipped = bytearray(base64.b64decode(key))
    flipped[0] ^= 1
    entry[0] = f"{name} {base64.b64encode(bytes(flipped)).decode()}"
    rosters[1].write_text("\n".join(entry) + "\n")
    refused = run(1, tmp_path / "tampered-output")

    # Assert: site 1 refused the round with a clear log line; nothing was summed
    assert refused[1]["clients"] == 0
    site1_log = (processes.logs / "supernode1.log").read_text(errors="replace")
    assert "secure aggregation refused by this site" in site1_log, site1_log[-3000:]
    assert "not another site of this site's roster" in site1_log

    # Execute: site 1's roster restored; site 0 restarted with its default
    # secagg-min-threshold (2), while two sites leave the coordinator no threshold
    # but t = 1 (k = 1 neighbour): a threshold too low for site 0
    rosters[1].write_text(rosters[0].read_text())
    processes.stop(supernodes[0])
    start_site(0, "supernode0-floor", min_threshold=2)
    wait_until(lambda: online_nodes() == 2, 120, "the restarted site", interval=2.0)
    too_low = run(1, tmp_path / "low-threshold-output")

    # Assert: site 0 refused to take part, saying why; nothing was summed
    assert too_low[1]["clients"] == 0
    site0_log = (processes.logs / "supernode0-floor.log").read_text(errors="replace")
    assert (
        "secure aggregation refused by this site: the coordinator asks for "
        "threshold 1, below this site's secagg-min-threshold = 2"
    ) in site0_log, site0_log[-3000:]


def site_keys(directory: Path, count: int) -> list[Path]:
    """``fedgraft site-keys`` for ``count`` sites; one roster copy per site."""
    shared = directory / "roster.txt"
    for index in range(count):
        arguments = ["site-keys", f"site{index}", "--out", str(directory)]
        assert cli.main([*arguments, "--roster", str(shared)]) == 0
    copies = [directory / f"roster{index}.txt" for index in range(count)]
    for copy in copies:
        copy.write_text(shared.read_text())
    return copies


def submit(env: dict[str, str], overrides: str) -> int:
    """``flwr run . deploy``; the run id."""
    submitted = subprocess.run(
        [str(BIN / "flwr"), "run", ".", "deploy", "--format", "json", "-c", overrides],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return int(json.loads(submitted.stdout)["run-id"])


def wait_for_run(env: dict[str, str], run_id: int) -> str:
    """Wait for ``run_id`` to finish; its status (with the ServerApp log on
    failure)."""

    def status() -> str:
        listing = subprocess.run(
            [str(BIN / "flwr"), "ls", "deploy", "--run-id", str(run_id)]
            + ["--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
        )
        try:
            return str(json.loads(listing.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return ""

    wait_until(
        lambda: status().startswith("finished"),
        900,  # a loaded 2-core machine: a secure round with site evaluation can take minutes
        f"run {run_id} to finish",
        interval=3.0,
    )
    final = status()
    if final != "finished:completed":
        logs = subprocess.run(
            [str(BIN / "flwr"), "log", str(run_id), "deploy", "--show"],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
        )
        return f"{final}:\n{logs.stdout[-4000:]}{logs.stderr[-2000:]}"
    return final
