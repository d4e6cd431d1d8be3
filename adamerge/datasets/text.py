"""Readers for the real text classification data sets under a data root.

Six tasks, each with named splits of :class:`TextExamples` (texts, int64 labels in ``0..C-1``, class
names in label order). One function per on-disk format:

- :func:`read_label_space_lines`: ``<label> <sentence>`` per line, labels ``0..C-1``
  (SST-2, TREC, SUBJ, MPQA; the Harvard NLP sentence-classification copies);
- :func:`read_tab_separated`: ``<class name>\\t<text>`` per line (SMS Spam: ``ham`` / ``spam``);
- :func:`read_ag_news_csv`: CSV with header ``label,title,description``, labels ``1..4``.

Every text is whitespace-normalised (runs of whitespace, line breaks included, become one space;
no text holds a newline, so one text fits one line of a file). Files are decoded as UTF-8, falling
back to cp1252 (SUBJ and TREC hold a few cp1252 bytes: ``\\xe9`` for é); lines are split on ``\\n`` only, never on
the Unicode line separators a permissive ``splitlines`` would honour. MPQA has three empty phrases;
they are kept (the row counts are those of the files) and carry ``""``.

Tasks that ship only one file (SUBJ, MPQA, AG News, SMS Spam) are split here, seeded::

    perm = numpy.random.default_rng(split_seed(seed, task)).permutation(rows)
    test = sorted(perm[:round(test_fraction * rows)]); train = sorted(perm[round(...):])

so both parts keep the file order. :attr:`TextTask.split` is a JSON-able record of how each part
was obtained (file names, or the seed, recipe, sizes and a sha256 of the row indices) for the
results to carry.

:data:`TEXT_TASKS` maps a task name to its loader ``(data_root, seed, test_fraction) -> TextTask``.
The data root is an argument everywhere; ``None`` falls back to ``$ADAMERGE_DATA_ROOT``, then to
``../shared/data`` relative to the repository root (see
:func:`adamerge.datasets.vision.resolve_data_root`).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import logging
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adamerge.datasets.vision import DATA_ROOT_ENV, resolve_data_root
from adamerge.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_TEST_FRACTION = 0.2
SPLIT_RECIPE = "numpy.random.default_rng(seed).permutation(rows); test = sorted(perm[:test_rows]), train = sorted(rest)"

SST2_CLASSES = ["negative", "positive"]
# Harvard NLP's TREC labels 0..5 (checked on the questions: 2 = "What does X stand for ?").
TREC_CLASSES = ["description", "entity", "abbreviation", "human", "location", "number"]
SUBJ_CLASSES = ["subjective", "objective"]  # 0: review snippets, 1: plot summaries
MPQA_CLASSES = ["negative", "positive"]
AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
SMS_SPAM_CLASSES = ["ham", "spam"]


@dataclass(frozen=True)
class TextExamples:
    """A labelled text data set held in memory.

    Attributes:
        texts: one whitespace-normalised string per row.
        labels: int64 labels in ``0..len(classes)-1``, shape (N,).
        classes: class names; ``classes[i]`` is the name of label ``i``.
    """

    texts: list[str]
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        if self.labels.dtype != np.int64 or self.labels.shape != (len(self.texts),):
            raise DataError(f"labels must be int64 of shape ({len(self.texts)},), got {self.labels.dtype} {self.labels.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(f"labels span {self.labels.min()}..{self.labels.max()}, expected 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> TextExamples:
        """The rows ``indices`` (in that order) as a new :class:`TextExamples`."""
        indices = np.asarray(indices, dtype=np.int64)
        return TextExamples([self.texts[i] for i in indices], self.labels[indices], list(self.classes))

    def class_counts(self) -> np.ndarray:
        """Rows per class, shape (C,)."""
        return np.bincount(self.labels, minlength=len(self.classes))


@dataclass(frozen=True)
class TextTask:
    """The splits of one task.

    Attributes:
        name: task name (a key of :data:`TEXT_TASKS`).
        splits: split name (``train``, ``test``, and ``dev`` for SST-2) -> examples.
        split: JSON-able record of how the splits were obtained (see :func:`describe_seeded_split`).
        indices: for seeded splits, split name -> int64 row indices into the source file; empty
            when the splits are the files themselves.
    """

    name: str
    splits: dict[str, TextExamples]
    split: dict
    indices: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """Class names in label order (the same in every split)."""
        return next(iter(self.splits.values())).classes

    @property
    def train(self) -> TextExamples:
        """The training split."""
        return self.splits["train"]

    @property
    def test(self) -> TextExamples:
        """The test split."""
        return self.splits["test"]


# --------------------------------------------------------------------------- file helpers


def normalise_text(text: str) -> str:
    """Collapse every run of whitespace (line breaks included) into one space and strip the ends."""
    return " ".join(text.split())


def _require_file(data_root: Path, relative: str) -> Path:
    path = data_root / relative
    if not path.is_file():
        raise DataError(f"missing data file {relative} under data root {data_root} (pass data_root=... or set ${DATA_ROOT_ENV})")
    return path


def read_text_file(path: Path) -> str:
    """A file's text: UTF-8, else cp1252 (the five bytes cp1252 leaves undefined read as U+FFFD)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.debug("%s is not UTF-8; decoding as cp1252", path)
        return raw.decode("cp1252", errors="replace")


def _lines(path: Path) -> list[tuple[int, str]]:
    """``(1-based line number, line)`` of every non-blank line, split on ``\\n`` only."""
    text = read_text_file(path)
    return [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _examples(texts: list[str], labels: list[int], classes: Sequence[str], path: Path) -> TextExamples:
    if not texts:
        raise DataError(f"{path} holds no examples")
    return TextExamples(texts, np.asarray(labels, dtype=np.int64), list(classes))


# --------------------------------------------------------------------------- formats


def read_label_space_lines(path: str | Path, classes: Sequence[str]) -> TextExamples:
    """A file of ``<label> <sentence>`` lines with integer labels ``0..C-1``.

    A label followed by nothing (MPQA has three such rows) gives an empty text.

    Args:
        path: the file.
        classes: class names in label order.

    Returns:
        The examples, in file order.

    Raises:
        DataError: naming the file and line of a missing or out-of-range label.
    """
    path = Path(path)
    texts, labels = [], []
    for number, line in _lines(path):
        head, _, sentence = line.lstrip().partition(" ")
        try:
            label = int(head)
        except ValueError:
            raise DataError(f"{path}:{number}: expected '<label> <sentence>', got {line[:60]!r}") from None
        if not 0 <= label < len(classes):
            raise DataError(f"{path}:{number}: label {label} outside 0..{len(classes) - 1}")
        texts.append(normalise_text(sentence))
        labels.append(label)
    return _examples(texts, labels, classes, path)


def read_tab_separated(path: str | Path, classes: Sequence[str]) -> TextExamples:
    """A file of ``<class name>\\t<text>`` lines (SMS Spam Collection).

    Args:
        path: the file.
        classes: class names in label order; every line's first field must be one of them.

    Returns:
        The examples, in file order.

    Raises:
        DataError: naming the file and line of a line without a tab or with an unknown class.
    """
    path = Path(path)
    label_of = {name: label for label, name in enumerate(classes)}
    texts, labels = [], []
    for number, line in _lines(path):
        name, tab, text = line.partition("\t")
        if not tab:
            raise DataError(f"{path}:{number}: expected '<class>\\t<text>', got {line[:60]!r}")
        if name not in label_of:
            raise DataError(f"{path}:{number}: unknown class {name!r}, expected one of {list(classes)}")
        texts.append(normalise_text(text))
        labels.append(label_of[name])
    return _examples(texts, labels, classes, path)


_BROKEN_ENTITY = re.compile(r"(?<!&)(#\d+|quot|amp|lt|gt|hellip);")
_HTML_TAG = re.compile(r"<[^<>]*>")


def clean_ag_news(text: str) -> str:
    """Undo AG News's escapes: ``\\`` for a line break, entities that lost their ``&`` (``#39;``),
    and drop the HTML tags (``<b>``, ``<A HREF=...>``) they decode to."""
    text = _BROKEN_ENTITY.sub(r"&\1;", text.replace("\\", " "))
    return normalise_text(_HTML_TAG.sub(" ", html.unescape(text)))


def read_ag_news_csv(path: str | Path, classes: Sequence[str], first_label: int = 1) -> TextExamples:
    """AG News CSV with header ``label,title,description``; the text is ``title. description``.

    Args:
        path: the CSV file.
        classes: class names in label order.
        first_label: the file's label of class 0 (AG News: 1..4 become 0..3).

    Returns:
        The examples, in file order; titles and descriptions are cleaned by :func:`clean_ag_news`.

    Raises:
        DataError: naming the file and row of a wrong header, field count or label.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""))
    header = next(reader, None)
    if header != ["label", "title", "description"]:
        raise DataError(f"{path}: expected the header 'label,title,description', got {header}")
    texts, labels = [], []
    for row in reader:
        if not row:
            continue
        if len(row) != 3:
            raise DataError(f"{path}:{reader.line_num}: expected 3 fields, got {len(row)}")
        try:
            label = int(row[0]) - first_label
        except ValueError:
            raise DataError(f"{path}:{reader.line_num}: label {row[0]!r} is not an integer") from None
        if not 0 <= label < len(classes):
            raise DataError(f"{path}:{reader.line_num}: label {row[0]} outside {first_label}..{first_label + len(classes) - 1}")
        title, description = clean_ag_news(row[1]), clean_ag_news(row[2])
        joiner = " " if not title or title[-1] in ".?!" else ". "
        texts.append(f"{title}{joiner}{description}".strip())
        labels.append(label)
    return _examples(texts, labels, classes, path)


# --------------------------------------------------------------------------- seeded splits


def split_seed(seed: int, task: str) -> int:
    """The seed of one task's split, derived from the master seed and the task name (stable)."""
    return zlib.crc32(f"{seed}:{task}".encode())


def _sha256_indices(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


def seeded_split(rows: int, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Disjoint ``train`` / ``test`` row indices of ``range(rows)``, each sorted.

    Args:
        rows: number of rows.
        test_fraction: share of the rows in ``test`` (rounded), in (0, 1).
        seed: seed of ``numpy.random.default_rng``.

    Raises:
        DataError: if either part would be empty.
    """
    test_rows = round(test_fraction * rows)
    if not 0 < test_rows < rows:
        raise DataError(f"test_fraction {test_fraction} of {rows} rows leaves an empty train or test part")
    perm = np.random.default_rng(seed).permutation(rows)  # (rows,)
    return {"train": np.sort(perm[test_rows:]).astype(np.int64), "test": np.sort(perm[:test_rows]).astype(np.int64)}


def describe_seeded_split(file: str, rows: int, seed: int, test_fraction: float, parts: Mapping[str, np.ndarray]) -> dict:
    """The JSON record of a seeded split: enough to regenerate and to verify it."""
    return {
        "kind": "seeded",
        "file": file,
        "rows": rows,
        "seed": seed,
        "test_fraction": test_fraction,
        "recipe": SPLIT_RECIPE,
        "parts": {name: {"size": len(index), "sha256": _sha256_indices(index)} for name, index in parts.items()},
    }


def _file_task(name: str, root: Path, files: Mapping[str, str], read: Callable[[Path], TextExamples]) -> TextTask:
    splits = {split: read(_require_file(root, relative)) for split, relative in files.items()}
    record = {"kind": "files", "files": dict(files), "sizes": {split: len(ex) for split, ex in splits.items()}}
    return TextTask(name, splits, record)


def _seeded_task(name: str, root: Path, relative: str, read: Callable[[Path], TextExamples], seed: int, test_fraction: float) -> TextTask:
    examples = read(_require_file(root, relative))
    task_seed = split_seed(seed, name)
    parts = seeded_split(len(examples), test_fraction, task_seed)
    splits = {part: examples.subset(index) for part, index in parts.items()}
    return TextTask(name, splits, describe_seeded_split(relative, len(examples), task_seed, test_fraction, parts), parts)


# --------------------------------------------------------------------------- the six tasks


def load_sst2(data_root: str | Path | None = None, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> TextTask:
    """SST-2 (binary sentiment of movie-review sentences): train 6,920, dev 872, test 1,821.

    ``seed`` and ``test_fraction`` are unused (the splits are the files).
    """
    files = {split: f"text/sst2/stsa.binary.{split}" for split in ("train", "dev", "test")}
    return _file_task("sst2", resolve_data_root(data_root), files, lambda p: read_label_space_lines(p, SST2_CLASSES))


def load_trec(data_root: str | Path | None = None, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> TextTask:
    """TREC question types (6 coarse classes): train 5,452, test 500.

    ``seed`` and ``test_fraction`` are unused (the splits are the files).
    """
    files = {"train": "text/trec/TREC.train.all", "test": "text/trec/TREC.test.all"}
    return _file_task("trec", resolve_data_root(data_root), files, lambda p: read_label_space_lines(p, TREC_CLASSES))


def load_subj(data_root: str | Path | None = None, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> TextTask:
    """SUBJ (subjective review snippet vs objective plot sentence): 10,000 rows, split seeded."""
    read = lambda p: read_label_space_lines(p, SUBJ_CLASSES)  # noqa: E731
    return _seeded_task("subj", resolve_data_root(data_root), "text/subj/subj.all", read, seed, test_fraction)


def load_mpqa(data_root: str | Path | None = None, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> TextTask:
    """MPQA opinion polarity of short phrases: 10,606 rows (3 empty), split seeded."""
    read = lambda p: read_label_space_lines(p, MPQA_CLASSES)  # noqa: E731
    return _seeded_task("mpqa", resolve_data_root(data_root), "text/mpqa/mpqa.all", read, seed, test_fraction)


def load_ag_news(data_root: str | Path | None = None, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> TextTask:
    """AG News topics (official test split, 7,600 rows, 1,900 a class), split seeded."""
    read = lambda p: read_ag_news_csv(p, AG_NEWS_CLASSES)  # noqa: E731
    return _seeded_task("ag_news", resolve_data_root(data_root), "text/ag_news/test.csv", read, seed, test_fraction)


def load_sms_spam(data_root: str | Path | None = None, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> TextTask:
    """UCI SMS Spam Collection v.1: 5,574 messages (747 spam), split seeded."""
    read = lambda p: read_tab_separated(p, SMS_SPAM_CLASSES)  # noqa: E731
    return _seeded_task("sms_spam", resolve_data_root(data_root), "text/sms_spam/SMSSpamCollection", read, seed, test_fraction)


TEXT_TASKS: dict[str, Callable[..., TextTask]] = {
    "sst2": load_sst2,
    "trec": load_trec,
    "subj": load_subj,
    "mpqa": load_mpqa,
    "ag_news": load_ag_news,
    "sms_spam": load_sms_spam,
}


def load_text_task(task: str, data_root: str | Path | None = None, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> TextTask:
    """The splits of one task of :data:`TEXT_TASKS`.

    Args:
        task: task name, a key of :data:`TEXT_TASKS`.
        data_root: data root (see :func:`adamerge.datasets.vision.resolve_data_root`).
        seed: master seed of the split of single-file tasks (each task derives its own with
            :func:`split_seed`).
        test_fraction: share of the rows that single-file tasks put in ``test``.

    Raises:
        DataError: for an unknown task, a missing file or a malformed line.
    """
    if task not in TEXT_TASKS:
        raise DataError(f"unknown text task {task!r}; known: {', '.join(TEXT_TASKS)}")
    loaded = TEXT_TASKS[task](data_root, seed=seed, test_fraction=test_fraction)
    logger.debug("loaded %s: %s, %d classes", task, {s: len(e) for s, e in loaded.splits.items()}, len(loaded.classes))
    return loaded
