"""The DHT record contract: round trips, unknown fields ignored, invalid records rejected."""

from __future__ import annotations

import math

import pytest

from swarm.records import InvalidRecord, ModelRecord, ServerRecord, ServerState


def good_record(**changes) -> dict:  # noqa: ANN003
    record = ServerRecord(state=ServerState.ONLINE, start=2, end=5, throughput=120.5, inference_rps=33.0,
                          cache_tokens_left=4096, public_name="alice", next_pings=(("QmNext", 0.004),))
    return record.to_wire() | changes


def test_round_trip_and_unknown_fields_are_ignored():
    value = good_record(future_field={"anything": [1, 2]})
    record = ServerRecord.from_wire(value)
    assert record.start == 2 and record.end == 5 and record.public_name == "alice"
    assert record.next_pings == (("QmNext", 0.004),)
    assert ServerRecord.from_wire(record.to_wire()) == record


@pytest.mark.parametrize(
    "changes",
    [
        {"start": "0"},
        {"start": 5, "end": 5},
        {"start": -1},
        {"throughput": -3.0},
        {"throughput": math.nan},
        {"inference_rps": math.inf},
        {"cache_tokens_left": -1},
        {"state": "dancing"},
        {"state": 1},
        {"codecs": "none"},
        {"codecs": [1, 2]},
        {"public_name": "x" * 1000},
        {"next_pings": {"QmNext": -1.0}},
        {"next_pings": ["QmNext"]},
        {"end": True},
    ],
)
def test_invalid_records_are_rejected(changes):
    with pytest.raises(InvalidRecord):
        ServerRecord.from_wire(good_record(**changes))


def test_missing_required_field_and_non_dict():
    value = good_record()
    del value["start"]
    with pytest.raises(InvalidRecord):
        ServerRecord.from_wire(value)
    with pytest.raises(InvalidRecord):
        ServerRecord.from_wire([1, 2, 3])


def test_model_record():
    model = ModelRecord(dht_prefix="tiny-llama", num_blocks=30, model_type="llama")
    assert ModelRecord.from_wire(model.to_wire()) == model
    for changes in ({"num_blocks": 0}, {"num_blocks": True}, {"num_blocks": 10**9}, {"dht_prefix": ""}, {"model_type": 3}):
        with pytest.raises(InvalidRecord):
            ModelRecord.from_wire(model.to_wire() | changes)
    with pytest.raises(InvalidRecord):
        ModelRecord.from_wire("x")
