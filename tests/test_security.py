"""TLS with certificates generated here, and nothing listening beyond 127.0.0.1."""

import subprocess

import grpc
import pytest
from service_process import ServiceProcess, free_port, is_loopback, listening_addresses

from clients.client import MemupdateClient

NOWHERE = f"http://127.0.0.1:{free_port()}"


def make_ca_and_server_cert(folder, name: str):
    """A throwaway CA and a server certificate it signed, valid for 127.0.0.1 and localhost."""

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        f"/CN={name} test CA",
        "-keyout",
        f"{name}-ca.key",
        "-out",
        f"{name}-ca.pem",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{name}-ca.pem",
        "-CAkey",
        f"{name}-ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        f"{name}.pem",
    )
    return folder / f"{name}-ca.pem", folder / f"{name}.pem", folder / f"{name}.key"


@pytest.fixture(scope="module")
def tls_service(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_ca_and_server_cert(folder, "server")
    other_ca, _, _ = make_ca_and_server_cert(folder, "other")
    proc = ServiceProcess(
        folder / "data",
        tiny_dir,
        "--vllm-url",
        NOWHERE,
        env={
            "MEMUPDATE_TLS_CERT": str(cert),
            "MEMUPDATE_TLS_KEY": str(key),
            "MEMUPDATE_AUTH_TOKENS": '{"w-secret": "writer"}',
        },
    )
    proc.start()
    yield proc, ca.read_bytes(), other_ca.read_bytes()
    proc.stop()


def test_tls_client_with_the_right_ca_is_served(tls_service):
    proc, ca, _ = tls_service
    with MemupdateClient(f"127.0.0.1:{proc.port}", "w-secret", ca) as client:
        assert client.health() == "SERVING"
        assert client.knowledge_bases() == []
    assert "(TLS)" in proc.log.read_text()


@pytest.mark.parametrize("how", ["plaintext", "untrusted CA"])
def test_tls_refuses_plaintext_and_untrusted_peers(tls_service, how):
    proc, _, other_ca = tls_service
    ca = None if how == "plaintext" else other_ca
    with MemupdateClient(f"127.0.0.1:{proc.port}", "w-secret", ca, retries=0) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.knowledge_bases()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_only_loopback_listens(tls_service):
    proc, _, _ = tls_service
    addresses = listening_addresses(proc.process.pid)
    assert {port for _, port in addresses} >= {proc.port, proc.metrics_port}
    assert all(is_loopback(host) for host, _ in addresses), addresses
