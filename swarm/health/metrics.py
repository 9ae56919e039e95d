"""The swarm's state in Prometheus' text exposition format (written here: a dozen lines)."""

from __future__ import annotations

from collections import Counter

from swarm.health.state import SwarmState


def prometheus_text(state: SwarmState) -> str:
    lines = [
        "# HELP swarm_servers Servers announcing blocks of the model, by state.",
        "# TYPE swarm_servers gauge",
    ]
    for model in state.models:
        states = Counter(server.state for server in model.servers)
        for name in ("joining", "online", "offline"):
            lines.append(f'swarm_servers{{model="{_label(model.dht_prefix)}",state="{name}"}} {states[name]}')
    gauges = [
        ("swarm_blocks", "Blocks of the model.", lambda m: m.num_blocks),
        ("swarm_blocks_covered", "Blocks served by at least one online server.", lambda m: sum(1 for r in m.replicas if r)),
        ("swarm_min_replicas", "Fewest online servers of any block.", lambda m: min(m.replicas, default=0)),
        ("swarm_healthy", "1 if every block has an online server.", lambda m: int(m.healthy)),
        ("swarm_throughput_tokens_per_second", "Sum of online servers' forward throughput per block.",
         lambda m: sum(s.throughput for s in m.servers if s.state == "online")),
        ("swarm_invalid_records", "Records that failed validation and were ignored.", lambda m: m.invalid_count),
    ]
    for name, help_text, value in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{model="{_label(model.dht_prefix)}"}} {value(model)}' for model in state.models]
    lines += ["# HELP swarm_invalid_index_records Model index entries that failed validation and were ignored.",
              "# TYPE swarm_invalid_index_records gauge", f"swarm_invalid_index_records {state.invalid_index_records}"]
    lines += ["# HELP swarm_server_versions Servers by announced version.", "# TYPE swarm_server_versions gauge"]
    versions = Counter(server.version for model in state.models for server in model.servers)
    lines += [f'swarm_server_versions{{version="{_label(version)}"}} {count}' for version, count in sorted(versions.items())]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
