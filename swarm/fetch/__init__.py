"""Fetching a model's files from the peers that share them, verified against its manifest.

A model id is the hash of the model's manifest (swarm/manifest.py), so a manifest fetched from any
stranger is believed only if it hashes to the id asked for; the config must then equal the
manifest's, every tokenizer file must have the manifest's sha256, and every tensor its size (known
before download) and sha256. Servers share what they hold over `swarm.fetch` and say so in their
DHT records (`ServerRecord.shares`).

    providers.py  who shares what, from the DHT
    transfer.py   one bounded download from one peer
    store.py      the cache folder: staged part files, renamed into place only once complete and verified
    fetcher.py    the whole fetch: manifest, config, tokenizer, then tensors from several peers at once
"""
