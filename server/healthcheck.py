"""Container health check through the standard gRPC health service (grpc.health.v1).

    python -m server.healthcheck [ADDR] [--service NAME] [--timeout S] [--tls-ca PEM]

Exits 0 only when the server at ADDR (default 127.0.0.1:$MEMUPDATE_GRPC_PORT, else :50051)
answers SERVING within the deadline; 1 when it answers anything else (NOT_SERVING during
shutdown, SERVICE_UNKNOWN) or cannot be reached. The health service needs no auth token. With
TLS (MEMUPDATE_TLS_CERT set, as for the server) the certificate is trusted as the root; pass
--server-name when it does not name the address. Imports only grpc, never torch, so a probe
costs a fraction of a second.
"""

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_address() -> str:
    return f"127.0.0.1:{os.environ.get('MEMUPDATE_GRPC_PORT', '50051')}"


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    tls_ca: Path | None = None,
    server_name: str | None = None,
) -> tuple[bool, str]:
    """(serving, what was seen) for one Check call with a deadline of `timeout` seconds."""
    if tls_ca is not None:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return False, f"{err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m server.healthcheck",
        description="Exit 0 only when the memupdate gRPC server reports SERVING.",
    )
    p.add_argument("address", nargs="?", default=default_address(), help="HOST:PORT")
    p.add_argument("--service", default="", help="service name to ask about ('' = the server)")
    p.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds")
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=os.environ.get("MEMUPDATE_TLS_CERT") or None,
        help="PEM to trust (default: $MEMUPDATE_TLS_CERT; unset = plaintext)",
    )
    p.add_argument("--server-name", help="TLS name to expect instead of the address's host")
    args = p.parse_args(argv)
    serving, seen = check(args.address, args.service, args.timeout, args.tls_ca, args.server_name)
    print(f"{args.address}: {seen}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
