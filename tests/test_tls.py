"""TLS and mutual TLS on the gRPC port, with certificates made here (cryptography)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import Processes, random_gradient, small_config
from gradhub import auth
from gradhub.codecs import codec_from_name
from gradhub.coordination import RunCoordinator
from gradhub.domain import PushMeta
from gradhub.errors import ServerUnavailable
from gradhub.models import build_model
from gradhub.tls import ClientTls, ServerTls
from gradhub_cli.health import check
from gradhub_worker.client import ParameterClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Pem(cert_path, key_path)


def make_ca(folder: Path, common: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(_name(common))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return _write(folder, common, cert, key), cert, key


def make_leaf(folder: Path, common: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _write(folder, common, cert, key)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Pem]:
    ca, ca_cert, ca_key = make_ca(tmp_path, "gradhub-ca")
    clients_ca, clients_cert, clients_key = make_ca(tmp_path, "gradhub-clients-ca")
    rogue, rogue_cert, rogue_key = make_ca(tmp_path, "rogue-ca")
    return {
        "ca": ca, "clients_ca": clients_ca, "rogue_ca": rogue,
        "server": make_leaf(tmp_path, "server", ca_cert, ca_key),
        "worker": make_leaf(tmp_path, "worker", clients_cert, clients_key),
        "rogue_worker": make_leaf(tmp_path, "rogue-worker", rogue_cert, rogue_key),
    }


def test_a_tls_server_answers_only_clients_that_trust_it(serve, run_id, pki):
    server = serve(small_config(run_id, workers=1), tls=ServerTls(pki["server"].cert, pki["server"].key))
    assert check(server.address, tls=ClientTls(pki["ca"].cert)) == "SERVING"
    assert check(server.address, timeout=2) == "UNREACHABLE"  # plaintext
    assert check(server.address, timeout=2, tls=ClientTls(pki["rogue_ca"].cert)) == "UNREACHABLE"


def test_mutual_tls_admits_only_workers_with_a_certificate_of_the_clients_ca(serve, run_id, pki):
    tls = ServerTls(pki["server"].cert, pki["server"].key, client_ca=pki["clients_ca"].cert)
    server = serve(small_config(run_id, mode="async", workers=1), tls=tls)
    server.register("w")
    codec = codec_from_name("none")
    gradient = [codec.encode(n, g) for n, g in random_gradient(build_model("cnn"), seed=4)]
    refused = [ClientTls(pki["ca"].cert),  # no client certificate
               ClientTls(pki["ca"].cert, pki["rogue_worker"].cert, pki["rogue_worker"].key)]
    for client_tls in refused:
        client = ParameterClient(server.address, run_id, "w", max_payload_bytes=1 << 26, tls=client_tls)
        try:
            with pytest.raises(ServerUnavailable):
                client.push(PushMeta(run_id, "w", 1, 0), gradient, timeout=5)
        finally:
            client.close()
    assert server.app.store.version == 0
    admitted = ClientTls(pki["ca"].cert, pki["worker"].cert, pki["worker"].key)
    client = ParameterClient(server.address, run_id, "w", max_payload_bytes=1 << 26, tls=admitted)
    try:
        assert client.push(PushMeta(run_id, "w", 1, 0), gradient, timeout=10).version == 1
    finally:
        client.close()


def test_server_and_worker_processes_train_over_mutual_tls_with_a_token(
    processes: Processes, redis_url: str, coordinator: RunCoordinator, run_id: str, tmp_path: Path, pki
):
    config = coordinator.publish_config(small_config(run_id, workers=2, steps=60, eval_every=30))
    out = tmp_path / "run"
    env = {auth.ENV_VAR: "a-token-for-this-tls-run-0123"}
    common = ["--redis-url", redis_url, "--run-id", config.run_id, "--torch-threads", "1"]
    server = processes.start("server", [
        sys.executable, "-m", "gradhub_server", *common, "--out", str(out), "--drain-timeout", "5",
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
        "--tls-client-ca", str(pki["clients_ca"].cert)], env)
    workers = [processes.start(f"worker-{rank}", [
        sys.executable, "-m", "gradhub_worker", *common, "--worker-id", f"worker-{rank}",
        "--tls-ca", str(pki["ca"].cert), "--tls-cert", str(pki["worker"].cert), "--tls-key", str(pki["worker"].key)],
        env) for rank in range(2)]
    assert server.wait(timeout=90) == 0, processes.log("server")
    for rank, worker in enumerate(workers):
        assert worker.wait(timeout=30) == 0, processes.log(f"worker-{rank}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 60
    assert summary["pushes_refused"] == 0
    # The health command over TLS is what a probe runs against such a server; the run is over now.
    probe = subprocess.run([sys.executable, "-m", "gradhub_cli.main", "health", "--address", "127.0.0.1:1",
                            "--tls-ca", str(pki["ca"].cert)], capture_output=True, text=True, timeout=30)
    assert probe.returncode == 1 and probe.stdout.strip() == "UNREACHABLE"
