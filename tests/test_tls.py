"""TLS and mutual TLS on the three listeners (issue 18): the HTTP port, the decision port
and gRPC of a real sidecar process. The tests make their own CA and certificates (the
`cryptography` package): plain text is refused where TLS is on, a client certificate
from another CA is refused where mTLS is on, the right one accepted."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(folder, "ca", "aforo test CA", None, ca=True)
    server, _, _ = _issue(folder, "server", "localhost", (ca_cert, ca_key), server=True)
    client, _, _ = _issue(folder, "client", "kong-gateway", (ca_cert, ca_key))
    _, other_cert, other_key = _issue(folder, "other-ca", "another CA", None, ca=True)
    stranger, _, _ = _issue(folder, "stranger", "kong-gateway", (other_cert, other_key))
    return Pki(ca, server, client, stranger)


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
