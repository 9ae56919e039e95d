#!/usr/bin/env bash
# Regenerate the checked-in protobuf modules in swarm/wire/ from proto/*.proto.
# Needs grpcio-tools (in the test extras); tests/test_layout.py fails if they drift from proto/
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=swarm/wire --pyi_out=swarm/wire proto/swarm_rpc.proto
