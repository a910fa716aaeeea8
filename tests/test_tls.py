"""TLS and mutual TLS on the three listeners (issue 18): the HTTP port, the decision port
and gRPC of a real sidecar process. The tests make their own CA and certificates (the
`cryptography` package): plain text is refused where TLS is on, a client certificate
from another CA is refused where mTLS is on, the right one accepted."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.config import SettingsError, load_settings
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2 as pb
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from tests.conftest import SidecarProcess

pytestmark = pytest.mark.slow
ASK = {"consumer_id": "nobody", "product": "api"}


@dataclass
class Pair:
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


Signer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _issue(
    folder: Path, label: str, subject: str, issuer: Signer | None, *, ca: bool = False, server: bool = False
) -> tuple[Pair, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer_cert, signer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(signer_cert.subject if signer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    pair = Pair(folder / f"{label}.crt", folder / f"{label}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pair, cert, key


@dataclass
class Pki:
    ca: Pair
    server: Pair
    client: Pair
    stranger: Pair  # a client certificate of another CA
    signer: Signer | None = None  # the CA's certificate and key, to issue more


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(folder, "ca", "aforo test CA", None, ca=True)
    server, _, _ = _issue(folder, "server", "localhost", (ca_cert, ca_key), server=True)
    client, _, _ = _issue(folder, "client", "kong-gateway", (ca_cert, ca_key))
    _, other_cert, other_key = _issue(folder, "other-ca", "another CA", None, ca=True)
    stranger, _, _ = _issue(folder, "stranger", "kong-gateway", (other_cert, other_key))
    return Pki(ca, server, client, stranger, (ca_cert, ca_key))


def _https(pki: Pki, client: Pair | None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return httpx.Client(verify=context, timeout=5)


def _probe(pki: Pki, client: Pair | None):
    def up(sidecar: SidecarProcess) -> bool:
        with _https(pki, client) as http:
            return http.get(f"https://127.0.0.1:{sidecar.port}/healthz").status_code == 200

    return up


def _grpc_decide(sidecar: SidecarProcess, pki: Pki, client: Pair | None, secure: bool = True) -> pb.Decision:
    if not secure:
        channel = grpc.insecure_channel(sidecar.grpc_target)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.cert.read_bytes(),
            private_key=None if client is None else client.key.read_bytes(),
            certificate_chain=None if client is None else client.cert.read_bytes(),
        )
        channel = grpc.secure_channel(sidecar.grpc_target, credentials)
    with channel:
        return pb_grpc.SidecarStub(channel).Authorize(pb.AuthorizeRequest(**ASK), timeout=5)


def _env(redis_url: str, prefix: str, pki: Pki, mutual: bool) -> dict[str, str]:
    env = {
        "AFORO_REDIS_URL": redis_url,
        "AFORO_KEY_PREFIX": prefix,
        "AFORO_TLS_CERT_FILE": str(pki.server.cert),
        "AFORO_TLS_KEY_FILE": str(pki.server.key),
    }
    if mutual:
        env["AFORO_TLS_CLIENT_CA_FILE"] = str(pki.ca.cert)
    return env


def test_tls_on_every_listener_and_plain_text_refused(start_sidecar, redis_url, prefix, pki):
    sidecar = start_sidecar(_env(redis_url, prefix, pki, mutual=False), probe=_probe(pki, None))
    with _https(pki, None) as http:
        assert http.get(f"https://127.0.0.1:{sidecar.port}/healthz").status_code == 200
        for port in (sidecar.port, sidecar.decision_port):
            answer = http.post(f"https://127.0.0.1:{port}/v1/authorize", json=ASK)
            assert answer.status_code == 403 and answer.json()["reason"] == "unknown_consumer"
    assert _grpc_decide(sidecar, pki, None).reason == "unknown_consumer"
    # Plain text where TLS is on: no answer.
    with httpx.Client(timeout=5) as plain:
        for port in (sidecar.port, sidecar.decision_port):
            with pytest.raises(httpx.HTTPError):
                plain.post(f"http://127.0.0.1:{port}/v1/authorize", json=ASK)
    with pytest.raises(grpc.RpcError) as refused:
        _grpc_decide(sidecar, pki, None, secure=False)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_takes_only_the_right_client_certificate(start_sidecar, redis_url, prefix, pki):
    sidecar = start_sidecar(_env(redis_url, prefix, pki, mutual=True), probe=_probe(pki, pki.client))
    with _https(pki, pki.client) as http:
        for port in (sidecar.port, sidecar.decision_port):
            answer = http.post(f"https://127.0.0.1:{port}/v1/authorize", json=ASK)
            assert answer.status_code == 403 and answer.json()["reason"] == "unknown_consumer"
    assert _grpc_decide(sidecar, pki, pki.client).reason == "unknown_consumer"
    for client in (None, pki.stranger):  # no certificate, and one another CA signed
        with _https(pki, client) as http:
            for port in (sidecar.port, sidecar.decision_port):
                with pytest.raises(httpx.HTTPError):
                    http.post(f"https://127.0.0.1:{port}/v1/authorize", json=ASK)
        with pytest.raises(grpc.RpcError) as refused:
            _grpc_decide(sidecar, pki, client)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_that_cannot_work_are_refused_at_start(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    cert, key = str(pki.server.cert), str(pki.server.key)
    cases = [
        ({"tls_cert_file": cert}, "go together"),
        ({"tls_key_file": key}, "go together"),
        ({"tls_client_ca_file": str(pki.ca.cert)}, "needs tls_cert_file"),
        ({"tls_cert_file": cert, "tls_key_file": str(tmp_path / "missing.key")}, "no such file"),
        ({"tls_cert_file": str(garbage), "tls_key_file": key}, "do not load"),
        ({"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": str(garbage)}, "do not load"),
    ]
    for values, message in cases:
        with pytest.raises(SettingsError, match=message):
            load_settings(values, environ={}).check_serving()
    assert load_settings({"tls_cert_file": cert, "tls_key_file": key}, environ={}).check_serving()


# --- reload on SIGHUP -----------------------------------------------------------------


def _served(port: int, pki_ca: Path, client: Pair | None, alpn: list[str] | None = None) -> int:
    """The serial number of the certificate a listener presents to a new connection."""
    context = ssl.create_default_context(cafile=str(pki_ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    if alpn:
        context.set_alpn_protocols(alpn)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


class _KeptAlive:
    """One HTTP/1.1 connection, kept open across requests (a gateway's pooled connection)."""

    def __init__(self, port: int, ca: Path, client: Pair) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(client.cert), str(client.key))
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.tls = context.wrap_socket(raw, server_hostname="localhost")
        self.file = self.tls.makefile("rb")

    def ask(self) -> int:
        body = json.dumps(ASK).encode()
        head = (
            "POST /v1/authorize HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.tls.sendall(head.encode() + body)
        status = int(self.file.readline().split()[1])
        length = 0
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        self.file.read(length)
        return status

    def close(self) -> None:
        self.file.close()
        self.tls.close()


def test_sighup_reloads_certificates_and_client_ca_without_dropping_connections(
    start_sidecar, redis_url, prefix, pki, tmp_path
):
    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    live_ca = tmp_path / "clients-ca.crt"
    shutil.copy(pki.server.cert, live.cert)
    shutil.copy(pki.server.key, live.key)
    shutil.copy(pki.ca.cert, live_ca)
    env = {
        "AFORO_REDIS_URL": redis_url,
        "AFORO_KEY_PREFIX": prefix,
        "AFORO_TLS_CERT_FILE": str(live.cert),
        "AFORO_TLS_KEY_FILE": str(live.key),
        "AFORO_TLS_CLIENT_CA_FILE": str(live_ca),
    }
    sidecar = start_sidecar(env, probe=_probe(pki, pki.client))
    grpc_port = int(sidecar.grpc_target.rpartition(":")[2])
    listeners = [(sidecar.port, None), (sidecar.decision_port, None), (grpc_port, ["h2"])]
    first = x509.load_pem_x509_certificate(pki.server.cert.read_bytes()).serial_number
    assert {_served(port, pki.ca.cert, pki.client, alpn) for port, alpn in listeners} == {first}
    kept = [_KeptAlive(port, pki.ca.cert, pki.client) for port in (sidecar.port, sidecar.decision_port)]
    assert [k.ask() for k in kept] == [403, 403]

    # A new CA: a new server certificate, and client certificates now signed by it.
    folder = tmp_path / "rotated"
    folder.mkdir()
    ca, ca_cert, ca_key = _issue(folder, "ca", "aforo test CA 2", None, ca=True)
    server, server_cert, _ = _issue(folder, "server", "localhost", (ca_cert, ca_key), server=True)
    client, _, _ = _issue(folder, "client", "kong-gateway", (ca_cert, ca_key))
    shutil.copy(server.cert, live.cert)
    shutil.copy(server.key, live.key)
    shutil.copy(ca.cert, live_ca)
    os.kill(sidecar.proc.pid, signal.SIGHUP)

    def rotated() -> bool:
        try:
            return all(_served(p, ca.cert, client, a) == server_cert.serial_number for p, a in listeners)
        except (OSError, ssl.SSLError):
            return False

    _wait(rotated, "the new certificate on every listener")
    # The connections made before the reload go on.
    assert [k.ask() for k in kept] == [403, 403]
    # The new client CA is the one trusted, on every listener.
    assert _grpc_decide(sidecar, Pki(ca, server, client, pki.client), client).reason == "unknown_consumer"
    rotated_pki = Pki(ca, server, client, pki.client)  # pki.client: the CA no longer trusted
    with _https(rotated_pki, pki.client) as http:
        for port in (sidecar.port, sidecar.decision_port):
            with pytest.raises(httpx.HTTPError):
                http.post(f"https://127.0.0.1:{port}/v1/authorize", json=ASK)
    with pytest.raises(grpc.RpcError) as refused:
        _grpc_decide(sidecar, rotated_pki, pki.client)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    # Files that do not load: logged, counted, and the certificates in use stay.
    live.cert.write_text("not a certificate")
    os.kill(sidecar.proc.pid, signal.SIGHUP)

    def failure_counted() -> bool:
        with _https(rotated_pki, client) as http:
            text = http.get(f"https://127.0.0.1:{sidecar.port}/metrics").text
        return 'aforo_tls_reloads_total{result="failed"} 1.0' in text

    _wait(failure_counted, "the failed reload in the metrics")
    assert all(_served(p, ca.cert, client, a) == server_cert.serial_number for p, a in listeners)
    assert [k.ask() for k in kept] == [403, 403]
    for k in kept:
        k.close()
    assert "TLS reload failed" in Path(sidecar.log_path).read_text()


def _wait(check, what: str, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sighup_with_workers_brings_up_workers_with_the_new_certificate(
    start_sidecar, redis_url, prefix, pki, tmp_path
):
    # Several workers: uvicorn's supervisor answers SIGHUP by starting new workers (which
    # load the files) before retiring the old ones.
    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    shutil.copy(pki.server.cert, live.cert)
    shutil.copy(pki.server.key, live.key)
    env = _env(redis_url, prefix, pki, mutual=False) | {
        "AFORO_TLS_CERT_FILE": str(live.cert),
        "AFORO_TLS_KEY_FILE": str(live.key),
        "AFORO_WORKERS": "2",
    }
    sidecar = start_sidecar(env, probe=_probe(pki, None))
    grpc_port = int(sidecar.grpc_target.rpartition(":")[2])
    listeners = [(sidecar.port, None), (sidecar.decision_port, None), (grpc_port, ["h2"])]
    server, server_cert, _ = _issue(tmp_path, "next", "localhost", pki.signer, server=True)
    shutil.copy(server.cert, live.cert)
    shutil.copy(server.key, live.key)
    os.kill(sidecar.proc.pid, signal.SIGHUP)

    def rotated() -> bool:
        # Ten connections to each listener: the kernel spreads them over the workers.
        try:
            served = {_served(p, pki.ca.cert, None, a) for p, a in listeners for _ in range(10)}
        except (OSError, ssl.SSLError):
            return False
        return served == {server_cert.serial_number}

    _wait(rotated, "every worker serving the new certificate", within=30)
    with _https(pki, None) as http:
        answer = http.post(f"https://127.0.0.1:{sidecar.decision_port}/v1/authorize", json=ASK)
        assert answer.status_code == 403
