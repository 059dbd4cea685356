#!/usr/bin/env python3
r"""Talks to a Tentacle agent with stock gRPC tooling (grpcio, the standard
health-checking and reflection packages), over mutual TLS.

    stock_client.py --target 127.0.0.1:PORT --server-cert FILE \
        --client-cert FILE --client-key FILE

Prints one JSON object to stdout:

    {"health": "SERVING", "script_health": "SERVING",
     "services": [...], "script_methods": [...]}

and exits 0; on any failure prints one line to stderr and exits 1.
"""

import argparse
import json
import os
import sys

# gRPC's C core logs handshake failures to stderr on its own; keep stderr to
# the one line this script prints unless the caller asks for more.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
from google.protobuf import descriptor_pool  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # noqa: E402
    ProtoReflectionDescriptorDatabase,
)

# The agent's certificate is self-signed with the DNS name "tentacle".
SERVER_NAME = "tentacle"
SCRIPT_SERVICE = "tentacle.v1.ScriptService"


class Failure(Exception):
    pass


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise Failure(f"cannot read {path}: {error.strerror}") from None


def describe(error):
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        details = (error.details() or "").replace("\n", " ")
        return f"{error.code().name}: {details}"
    return " ".join(str(error).split()) or type(error).__name__


def check(stub, service, timeout):
    try:
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.RpcError as error:
        label = service or '""'
        raise Failure(f"Health/Check {label} failed: {describe(error)}") from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def run(args):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.server_cert),
        private_key=read(args.client_key),
        certificate_chain=read(args.client_cert),
    )
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with grpc.secure_channel(args.target, credentials, options=options) as channel:
        # The first call connects; without wait_for_ready a refused
        # handshake fails it at once with UNAVAILABLE and the TLS reason.
        health = health_pb2_grpc.HealthStub(channel)
        result = {
            "health": check(health, "", args.timeout),
            "script_health": check(health, SCRIPT_SERVICE, args.timeout),
        }

        reflection = ProtoReflectionDescriptorDatabase(channel)
        try:
            result["services"] = sorted(reflection.get_services())
            # Resolve one service's descriptor (and its imports) as grpcurl
            # `describe` would, to show reflection serves whole files.
            pool = descriptor_pool.DescriptorPool(reflection)
            service = pool.FindServiceByName(SCRIPT_SERVICE)
            result["script_methods"] = [m.name for m in service.methods]
        except Exception as error:  # grpc.RpcError or a descriptor error
            raise Failure(f"server reflection failed: {describe(error)}") from None
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the agent")
    parser.add_argument("--server-cert", required=True, help="the agent's PEM certificate")
    parser.add_argument("--client-cert", required=True, help="this client's PEM certificate")
    parser.add_argument("--client-key", required=True, help="this client's PEM private key")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    args = parser.parse_args()
    try:
        result = run(args)
    except Failure as error:
        print(f"stock_client: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # anything unexpected still gets one line
        print(f"stock_client: {type(error).__name__}: {describe(error)}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
