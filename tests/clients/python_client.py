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
        with grpc.secure_channel(arguments.target, credentials, options=options) as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            metadata = [("authorization", f"Bearer {arguments.key}")] if arguments.key else []
            try:
                reply = stub.RequestToken(
                    broker_pb2.RequestTokenRequest(scope=arguments.scope, task_id=arguments.task),
                    metadata=metadata,
                    timeout=10,
                )
            except grpc.RpcError as error:
                print(json.dumps({"error": error.code().name, "details": error.details()}))
                return
            print(
                json.dumps(
                    {
                        "grant_id": reply.grant.id,
                        "principal": reply.grant.principal,
                        "token_parts": len(reply.token.split(".")),
                    }
                )
            )


if __name__ == "__main__":
    main()
