"""A loopback deployment with TLS and SuperNode authentication.

The test makes its own PKI with the ``cryptography`` package (a CA, a server
certificate for 127.0.0.1 and two SuperNode EC P-384 key pairs), starts a SuperLink
that requires both TLS and registered SuperNode keys, shows that a registered
SuperNode joins while an unregistered one is refused, and trains one round over the
authenticated connection. ``docs/SECURE_DEPLOYMENT.md`` gives the same commands to
operators.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import RunConfig
from common.demo import demo_test_examples, demo_train_examples
from common.splits import site_evaluation_rows
from tests.conftest import REPO_ROOT, build_tiny_backbone, flower_env, write_jsonl
from tests.loopback_ports import PortLease
from tests.test_deployment import BIN, Processes, serving, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONNECTION = "secure"  # the connection name in $FLWR_HOME/config.toml
# Flower logs its own exit code (ExitCode.SUPERNODE_CONNECTION_ERROR = 305) but
# ``flwr_exit`` maps every error code to the process exit status 1.
REFUSED_EXIT_CODE = 305
REFUSED_EXIT_STATUS = 1


# --------------------------------------------------------------------------- PKI
def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Write a self-signed CA as ``ca.key`` and ``ca.crt``; return key and cert."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgraft test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA384())
    )
    (directory / "ca.key").write_bytes(_pem_key(key))
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def write_server_certificate(
    directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> None:
    """Write ``server.key`` and ``server.pem`` (signed by the CA) for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    (directory / "server.key").write_bytes(_pem_key(key))
    (directory / "server.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
    )


def write_supernode_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write an EC P-384 OpenSSH key pair ``name`` and ``name.pub``; return both."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / name
    public = directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode()
    )
    return private, public


def healthy_tls(port: int, ca_file: Path) -> bool:
    """True when the TLS SuperLink answers /health on ``port`` with a cert we trust."""
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/health", timeout=2, context=context
        ) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


# ----------------------------------------------------------------------- fixture
@dataclass
class SecureDeployment:
    """What the test needs to drive a TLS + SuperNode-auth deployment."""

    processes: Processes
    env: dict[str, str]
    port: int
    pki: Path

    def flwr(
        self, *arguments: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI from the repository root with the test's env."""
        return subprocess.run(
            [str(BIN / "flwr"), *arguments],
            env=self.env,
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=timeout,
        )


@pytest.fixture()
def secure_deployment(tmp_path: Path) -> Iterator[SecureDeployment]:
    """A PKI, a private FLWR_HOME with a ``secure`` connection, and a process list."""
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key, ca_cert = write_ca(pki)
    write_server_certificate(pki, ca_key, ca_cert)
    for name in ("sn0", "sn1"):
        write_supernode_keys(pki, name)
    home = tmp_path / "flwr-home"
    home.mkdir()
    ports = PortLease()
    port = ports.take()
    env = flower_env(
        home,
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{pki / "ca.crt"}"\n',
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = Processes(env, logs, ports)
    try:
        yield SecureDeployment(processes, env, port, pki)
    finally:
        processes.stop_all()
        for log in sorted(logs.glob("*.log")):
            sys.stderr.write(
                f"--- {log.name} (last 3000 bytes)\n"
                f"{log.read_bytes()[-3000:].decode(errors='replace')}\n"
            )


# -------------------------------------------------------------------------- test
def test_registered_supernode_trains_and_unregistered_is_refused(
    secure_deployment: SecureDeployment, tmp_path: Path
) -> None:
    """Only the SuperNode whose key was registered joins, and it trains a round."""
    # Prepare: a tiny backbone and one site's rows; the coordinator holds no data,
    # only the label map, so the site evaluates on its own held-out rows
    deployment = secure_deployment
    pki = deployment.pki
    backbone = build_tiny_backbone(tmp_path / "backbone")
    train = [e for e in demo_train_examples(seed=3) if e.extra["domain"] == "banking"]
    test = [e for e in demo_test_examples(seed=3) if e.extra["domain"] == "banking"]
    labels = sorted({e.label for e in test})
    site_rows = [
        {"text": e.text, "label": e.label}
        for label in labels
        for e in [r for r in train if r.label == label][:8]
    ]
    site = write_jsonl(tmp_path / "site0.jsonl", site_rows)
    label_file = tmp_path / "labels.txt"
    label_file.write_text("".join(f"{label}\n" for label in labels))
    output = tmp_path / "run-output"

    deployment.processes.start(
        "superlink",
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile",
        str(pki / "ca.crt"),
        "--ssl-certfile",
        str(pki / "server.pem"),
        "--ssl-keyfile",
        str(pki / "server.key"),
        "--enable-supernode-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(deployment.port),
        "--database",
        str(tmp_path / "state.db"),
        "--disable-runtime-dependency-installation",
    )
    wait_until(
        lambda: healthy_tls(deployment.port, pki / "ca.crt"), 60, "the TLS SuperLink"
    )

    def start_supernode(index: int) -> tuple[subprocess.Popen[bytes], int]:
        node_port = deployment.processes.ports.take()
        node_config = f'data-path="{site}" cache-dir="{tmp_path / f"cache{index}"}"'
        process = deployment.processes.start(
            f"supernode{index}",
            str(BIN / "flower-supernode"),
            "--root-certificates",
            str(pki / "ca.crt"),
            "--auth-supernode-private-key",
            str(pki / f"sn{index}"),
            "--superlink",
            f"127.0.0.1:{deployment.port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(node_port),
            "--node-config",
            node_config,
        )
        return process, node_port

    def node_statuses() -> list[str]:
        listing = deployment.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            return [str(n["status"]) for n in json.loads(listing.stdout)["nodes"]]
        except (ValueError, KeyError, TypeError):
            return []

    # Execute: register sn0's key before it starts, then start it
    registered = deployment.flwr(
        "supernode", "register", str(pki / "sn0.pub"), CONNECTION, "--name", "sn0"
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert node_statuses() == ["registered"]
    sn0, sn0_port = start_supernode(0)
    wait_until(serving(sn0, sn0_port), 60, "SuperNode sn0's runtime API")
    wait_until(lambda: "online" in node_statuses(), 90, "sn0 online", interval=2.0)

    # sn1's key was never registered: the SuperLink refuses it and it exits by itself
    sn1, _ = start_supernode(1)
    try:
        exit_code = sn1.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the unregistered SuperNode sn1 was not refused within 90s")
    sn1_log = (deployment.processes.logs / "supernode1.log").read_text(errors="replace")
    assert exit_code == REFUSED_EXIT_STATUS, sn1_log[-3000:]
    assert f"Exit Code: {REFUSED_EXIT_CODE}" in sn1_log, sn1_log[-3000:]
    assert "Failed to activate SuperNode" in sn1_log, sn1_log[-3000:]
    assert sn0.poll() is None, "the registered SuperNode should still be running"
    assert node_statuses() == ["online"], "only sn0 is known to the SuperLink"

    # Execute: one round over the authenticated TLS connection
    overrides = (
        f'num-server-rounds=1 model.name="{backbone}" '
        f'data.labels="{label_file}" '
        f'output.dir="{output}" train.min-clients=1 train.batch-size=8 '
        "train.timeout=300.0"
    )
    submitted = deployment.flwr(
        "run", ".", CONNECTION, "--format", "json", "-c", overrides, timeout=120
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = json.loads(submitted.stdout)["run-id"]

    def run_status() -> str:
        listing = deployment.flwr(
            "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"
        )
        try:
            return str(json.loads(listing.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return ""

    wait_until(
        lambda: run_status().startswith("finished"),
        420,
        f"run {run_id} to finish",
        interval=3.0,
    )

    # Assert: the run completed and the one registered site trained in round 1
    status = run_status()
    if status != "finished:completed":
        logs = deployment.flwr("log", str(run_id), CONNECTION, "--show")
        pytest.fail(
            f"run {run_id} ended {status}:\n{logs.stdout[-4000:]}{logs.stderr[-2000:]}"
        )
    metrics = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in metrics] == [0, 1]
    assert metrics[1]["clients"] == 1
    # ...and the site, not the coordinator, evaluated: on its own held-out rows
    held_out = site_evaluation_rows(
        RunConfig.from_flat({"data.labels": str(label_file)}).data,
        RunConfig.from_flat({}).seed,
        0,
        1,
        site_data_path=str(site),
    )
    assert [row["sites_eval_examples"] for row in metrics] == [len(held_out)] * 2
    assert all(row["sites_evaluated"] == 1 for row in metrics)
    assert all(row["eval_accuracy"] == row["sites_eval_accuracy"] for row in metrics)
    assert sn1.returncode == REFUSED_EXIT_STATUS
