#!/usr/bin/env bash
# Regenerate the checked-in protobuf modules in swarm/wire/ from proto/*.proto.
# Needs grpcio-tools (pip install -e '.[dev]'); tests/test_proto_drift.py fails if they drift.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=swarm/wire --pyi_out=swarm/wire proto/swarm_rpc.proto
