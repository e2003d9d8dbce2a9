"""A Python gRPC client (grpcio) for valetd, used by the end-to-end tests to prove that a
non-Rust client interoperates over TLS and mTLS: it compiles the proto files with grpcio-tools,
connects with the CA (and client certificate) it is given, requests one token, and prints the
result (or the gRPC error) as one JSON line."""

import argparse
import json
import os
import sys
import tempfile


def compile_protos(repository, out):
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    proto_root = os.path.join(repository, "proto")
    files = [
        os.path.join("valet", "v1", name)
        for name in sorted(os.listdir(os.path.join(proto_root, "valet", "v1")))
        if name.endswith(".proto")
    ]
    status = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
        + files
    )
    if status != 0:
        raise SystemExit(f"protoc failed with {status}")
    sys.path.insert(0, out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", required=True)
    parser.add_argument("--target", required=True, help="host:port of valetd's gRPC listener")
    parser.add_argument("--server-name", default=None, help="the name to verify the certificate for")
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--cert-file")
    parser.add_argument("--key-file")
    parser.add_argument("--key", help="a principal key, sent as the bearer credential")
    parser.add_argument("--scope", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument(
        "--until-refused",
        type=float,
        help="call again on the same channel every half second until refused (at most this many "
        "seconds), then once on a new channel sharing a TLS session cache with the first",
    )
    arguments = parser.parse_args()

    import grpc

    with tempfile.TemporaryDirectory() as out:
        compile_protos(arguments.repository, out)
        from valet.v1 import broker_pb2, broker_pb2_grpc

        def read(path):
            with open(path, "rb") as handle:
                return handle.read()

        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(arguments.ca_file),
            private_key=read(arguments.key_file) if arguments.key_file else None,
            certificate_chain=read(arguments.cert_file) if arguments.cert_file else None,
        )
        options = []
        if arguments.server_name:
            options.append(("grpc.ssl_target_name_override", arguments.server_name))
        metadata = [("authorization", f"Bearer {arguments.key}")] if arguments.key else []

        def call(channel):
            stub = broker_pb2_grpc.BrokerStub(channel)
            try:
                reply = stub.RequestToken(
                    broker_pb2.RequestTokenRequest(scope=arguments.scope, task_id=arguments.task),
                    metadata=metadata,
                    timeout=10,
                )
            except grpc.RpcError as error:
                return {"error": error.code().name, "details": error.details()}
            return {
                "grant_id": reply.grant.id,
                "principal": reply.grant.principal,
                "token_parts": len(reply.token.split(".")),
            }

        if arguments.until_refused is None:
            with grpc.secure_channel(arguments.target, credentials, options=options) as channel:
                print(json.dumps(call(channel)))
            return

        # One TLS session cache for both channels: grpcio resumes a session when the server
        # allows it.
        import time

        from grpc.experimental import session_cache

        cache = session_cache.ssl_session_cache_lru(8)
        options.append(("grpc.ssl_session_cache", cache))
        outcome = {}
        with grpc.secure_channel(arguments.target, credentials, options=options) as channel:
            outcome["first"] = call(channel)
            deadline = time.monotonic() + arguments.until_refused
            n_calls = 1
            while time.monotonic() < deadline:
                time.sleep(0.5)
                result = call(channel)
                n_calls += 1
                if "error" in result:
                    outcome["refused"] = result
                    break
            outcome["n_calls_on_first_channel"] = n_calls
            with grpc.secure_channel(arguments.target, credentials, options=options) as again:
                outcome["new_channel"] = call(again)
        print(json.dumps(outcome))

if __name__ == "__main__":
    main()
