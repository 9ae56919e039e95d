"""Adapter names in the DHT: servers keep the publishers' signed name records alive; anyone reads them.

Keys (see swarm.adapter_records): `name_key(base, name)` holds, under each holder's subkey, the
publisher's signed document as the holder last received it; `names_key(base)` holds, under each
holder's subkey, that holder's signed list of the names it carries.
"""

from __future__ import annotations

import functools

from hivemind.utils import get_dht_time

from swarm.adapter_records import AdapterName, best_name_record, name_key, names_key, open_names_list
from swarm.dht import DHT, DHT_CALL_TIMEOUT, _entries, _get_many, _own_subkey, _store_many
from swarm.errors import InvalidRecord
from swarm.records import RecordSigner, Rejections

MAX_NAMES_READ = 1024  # names one listing reads (each holder lists at most MAX_NAMES_PER_SERVER)


def declare_adapter_names(dht: DHT, signer: RecordSigner, base: str, records: list[AdapterName], expiration: float) -> None:
    """Store the documents this peer carries, and its signed list of their names, in one DHT call."""
    subkey = _own_subkey(dht)
    expires_at = get_dht_time() + expiration
    keys = [name_key(base, record.name) for record in records] + [names_key(base)]
    values = [record.envelope for record in records]
    values.append(signer.seal(names_key(base), subkey, expires_at, {"names": [record.name for record in records]}))
    call = functools.partial(_store_many, keys=keys, values=values, subkeys=[subkey] * len(keys), expiration=expires_at)
    dht.run_coroutine(call, return_future=True).result(DHT_CALL_TIMEOUT)


def fetch_adapter_name(dht: DHT, base: str, name: str, rejected: Rejections | None = None) -> AdapterName | None:
    """The name's document that its holders agree on, or None if nobody carries the name."""
    return fetch_adapter_names_at(dht, base, [name], rejected).get(name)


def fetch_adapter_names_at(dht: DHT, base: str, names: list[str], rejected: Rejections | None = None) -> dict[str, AdapterName]:
    rejected = Rejections() if rejected is None else rejected
    keys = {name: name_key(base, name) for name in names}
    raw = dht.run_coroutine(functools.partial(_get_many, keys=list(keys.values())), return_future=True).result(DHT_CALL_TIMEOUT)
    found = {}
    for name, key in keys.items():
        record = best_name_record(base, name, _entries(raw.get(key, {}), rejected), rejected)
        if record is not None:
            found[name] = record
    return found


def fetch_all_adapter_names(dht: DHT, base: str, rejected: Rejections | None = None) -> dict[str, AdapterName]:
    """Every name some holder lists for this base model, with its document."""
    rejected = Rejections() if rejected is None else rejected
    key = names_key(base)
    raw = dht.run_coroutine(functools.partial(_get_many, keys=[key]), return_future=True).result(DHT_CALL_TIMEOUT)
    names: set[str] = set()
    for entry in _entries(raw.get(key, {}), rejected):
        try:
            names.update(open_names_list(base, entry))
        except InvalidRecord as e:
            rejected.add(entry.peer_id, f"adapter names: {e}")
    return fetch_adapter_names_at(dht, base, sorted(names)[:MAX_NAMES_READ], rejected) if names else {}
