"""Adapter names: who published NAME, its versions and their lineage, signed by the publisher's key.

A name record is one document for one name of one base model:

    {"name", "base", "versions": [{"version": 1, "hash", "parents": [hash...], "method", "provenance", "created"}...]}

signed with swarm.records' envelope by the publisher's libp2p RSA key, for the DHT key
`name_key(base, name)`, the publisher's peer id as subkey and expiration 0: the signature does not
depend on when or by whom the document is stored, so the servers holding the adapter can keep it
in the DHT (under their own subkeys, refreshed with their records) long after the publisher left.
Only the holder of the publisher's key can sign a document with more versions; a reader takes,
for a name, the longest valid document of the publisher that the most holders carry (a peer that
signs the same name with another key is a claim of its own, and loses unless more holders carry it).

Each server also keeps a signed list of the names it holds under `names_key(base)`, so that
`swarm-adapter list` can find names without knowing them. Every value is bounded and checked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from swarm.adapter_manifest import check_hash
from swarm.errors import InvalidRecord, InvalidRequest
from swarm.records import RawEntry, RecordSigner, Rejections, envelope_signer, open_envelope

MAX_NAME_RECORD_BYTES = 64 << 10
MAX_VERSIONS = 64
MAX_PARENTS = 8
MAX_METHOD_CHARS = 128
MAX_PROVENANCE_CHARS = 1024
MAX_NAMES_PER_SERVER = 64
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def name_key(base: str, name: str) -> str:
    return f"{base}.adapter.{name}"


def names_key(base: str) -> str:
    return f"{base}.adapters"


def check_name(name: str) -> str:
    """A name as given by a user: letters, digits, '.', '_', '-', at most 64, starting with a letter or digit."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidRequest(f"adapter name {str(name)[:80]!r} must be 1-64 letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit)")
    return name


@dataclasses.dataclass(frozen=True)
class AdapterVersion:
    version: int  # 1, 2, ...
    hash: str  # of the adapter's manifest (swarm.adapter_manifest)
    parents: tuple[str, ...] = ()  # hashes this version was made from (a merge's inputs, a fine-tune's start)
    method: str = "trained"  # how it was made, e.g. "trained", "merge ties density=0.5 weights=1,1"
    provenance: str = ""  # free-form: training data and their hashes, who, why
    created: float = 0.0  # UNIX time, as the publisher's clock says

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version, "hash": self.hash, "parents": list(self.parents), "method": self.method,
                "provenance": self.provenance, "created": float(self.created)}

    @classmethod
    def from_wire(cls, value: Any) -> AdapterVersion:
        if not isinstance(value, dict):
            raise InvalidRecord("a version is not a dict")
        version, digest, parents = value.get("version"), value.get("hash"), value.get("parents")
        method, provenance, created = value.get("method"), value.get("provenance"), value.get("created")
        if isinstance(version, bool) or not isinstance(version, int) or not 0 < version <= MAX_VERSIONS:
            raise InvalidRecord("bad version number")
        try:
            digest = check_hash(digest)
            if not isinstance(parents, list) or len(parents) > MAX_PARENTS:
                raise InvalidRecord("bad parents")
            for parent in parents:
                check_hash(parent)
        except InvalidRequest as e:
            raise InvalidRecord(str(e)) from None
        if not isinstance(method, str) or len(method) > MAX_METHOD_CHARS:
            raise InvalidRecord("bad method")
        if not isinstance(provenance, str) or len(provenance) > MAX_PROVENANCE_CHARS:
            raise InvalidRecord("bad provenance")
        if not isinstance(created, float):
            raise InvalidRecord("bad creation time")
        return cls(version, digest, tuple(parents), method, provenance, created)


@dataclasses.dataclass(frozen=True)
class AdapterName:
    name: str
    base: str
    versions: tuple[AdapterVersion, ...]
    publisher: str = ""  # peer id of the signing key; set when signed or verified
    envelope: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def latest(self) -> AdapterVersion:
        return self.versions[-1]

    def version(self, number: int | None) -> AdapterVersion:
        """A version by number (None: the latest); InvalidRequest naming the versions that exist."""
        if number is None:
            return self.latest()
        for version in self.versions:
            if version.version == number:
                return version
        raise InvalidRequest(f"adapter {self.name!r} has no version {number} (versions: 1..{self.latest().version})")

    def with_version(self, digest: str, parents: Iterable[str], method: str, provenance: str, created: float) -> AdapterName:
        """The next version appended (the record's publisher must sign the result)."""
        number = self.latest().version + 1 if self.versions else 1
        if number > MAX_VERSIONS:
            raise InvalidRequest(f"adapter {self.name!r} has reached {MAX_VERSIONS} versions; publish under a new name")
        version = AdapterVersion(number, check_hash(digest), tuple(parents), method[:MAX_METHOD_CHARS],
                                 provenance[:MAX_PROVENANCE_CHARS], float(created))
        AdapterVersion.from_wire(version.to_wire())  # the bounds a reader checks
        return dataclasses.replace(self, versions=(*self.versions, version), envelope=None)

    def fields(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "versions": [v.to_wire() for v in self.versions]}

    def sign(self, signer: RecordSigner) -> AdapterName:
        key = name_key(self.base, self.name)
        envelope = signer.seal(key, signer.peer_id.encode(), 0.0, self.fields())
        return dataclasses.replace(self, publisher=signer.peer_id, envelope=envelope)


def open_name_record(base: str, name: str, value: Any) -> AdapterName:
    """A name document as signed by its publisher for this base model and name; else InvalidRecord."""
    publisher = envelope_signer(value)
    fields = open_envelope(name_key(base, name), publisher, publisher.encode(), 0.0, value, MAX_NAME_RECORD_BYTES)
    if fields.get("name") != name or fields.get("base") != base:
        raise InvalidRecord("the name record is for another name or base model")
    versions = fields.get("versions")
    if not isinstance(versions, list) or not 0 < len(versions) <= MAX_VERSIONS:
        raise InvalidRecord(f"a name record needs 1..{MAX_VERSIONS} versions")
    parsed = tuple(AdapterVersion.from_wire(v) for v in versions)
    if [v.version for v in parsed] != list(range(1, len(parsed) + 1)):
        raise InvalidRecord("versions must be numbered 1, 2, ... in order")
    return AdapterName(name, base, parsed, publisher, value)


def best_name_record(base: str, name: str, entries: Iterable[RawEntry], rejected: Rejections) -> AdapterName | None:
    """The document for `name` that holders agree on (see the module docstring), or None if there is none."""
    documents: dict[str, list[AdapterName]] = {}
    for entry in entries:
        try:
            record = open_name_record(base, name, entry.value)
        except InvalidRecord as e:
            rejected.add(entry.peer_id, f"adapter name {name}: {e}")
            continue
        documents.setdefault(record.publisher, []).append(record)
    if not documents:
        return None
    publisher = max(documents, key=lambda p: (len(documents[p]), p))
    return max(documents[publisher], key=lambda record: len(record.versions))


def open_names_list(base: str, entry: RawEntry) -> list[str]:
    """The names a server says it holds (signed by that server); else InvalidRecord."""
    fields = open_envelope(names_key(base), entry.peer_id, entry.subkey, entry.expiration, entry.value)
    names = fields.get("names")
    if not isinstance(names, list) or len(names) > MAX_NAMES_PER_SERVER or not all(
        isinstance(n, str) and NAME_PATTERN.match(n) for n in names
    ):
        raise InvalidRecord("bad list of adapter names")
    return names
