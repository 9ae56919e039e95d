"""The import graph is the architecture: swarm/ never imports the sides; client and server never each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDES = {"swarm": ROOT / "swarm", "swarm.client": ROOT / "client", "swarm.server": ROOT / "server"}
FORBIDDEN = {
    "swarm": ("swarm.client", "swarm.server"),
    "swarm.client": ("swarm.server",),
    "swarm.server": ("swarm.client",),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_import_crosses_sides():
    offences = []
    for side, directory in SIDES.items():
        for path in directory.rglob("*.py"):
            if side == "swarm" and path == directory / "__init__.py":
                continue  # the public facade re-exports the client lazily, on attribute access only
            for name in _imports(path):
                if name.split(".")[0] in ("client", "server"):
                    offences.append(f"{path.relative_to(ROOT)} imports top-level {name!r}")
                if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[side]):
                    offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offences, "\n".join(offences)


def test_importing_swarm_has_no_side_effects():
    code = "import sys, swarm; assert 'swarm.client' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_generated_proto_matches_source(tmp_path):
    """The checked-in swarm/wire/*_pb2 modules are what grpcio-tools makes from proto/."""
    grpc_tools = __import__("pytest").importorskip("grpc_tools.protoc")
    for proto in (ROOT / "proto").glob("*.proto"):
        result = grpc_tools.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", str(proto)])
        assert result == 0, f"protoc failed on {proto.name}"
        for generated in tmp_path.glob(f"{proto.stem}_pb2*"):
            checked_in = ROOT / "swarm" / "wire" / generated.name
            assert checked_in.read_text() == generated.read_text(), f"{checked_in} drifted from {proto}: run scripts/gen_proto.sh"


def test_the_core_type_checks():
    """mypy on swarm/, the core both sides share (STYLE.md 18)."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-error-summary", str(ROOT / "swarm")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
