"""BBC News loading and splitting, tokenization and batching (spectral_peft.tools.data)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from spectral_peft.tools.data import (
    BBC_NEWS_LABELS,
    BBC_NEWS_SIZE,
    BatchStream,
    batches,
    bbc_news_dir,
    default_model_path,
    load_bbc_news,
    tokenize_classification,
)

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news(seed=0)


def _key(example: dict) -> tuple:
    return example["label"], example["text"]


def test_folders_are_the_labels():
    assert tuple(sorted(p.name for p in bbc_news_dir().iterdir() if p.is_dir() and not p.name.startswith("_"))) == BBC_NEWS_LABELS


def test_split_sizes_add_up(bbc):
    assert set(bbc) == set(SPLITS)
    assert sum(len(bbc[name]) for name in SPLITS) == BBC_NEWS_SIZE == 2225
    total = BBC_NEWS_SIZE
    assert abs(len(bbc["test"]) - 0.2 * total) <= len(BBC_NEWS_LABELS)
    assert abs(len(bbc["validation"]) - 0.1 * total) <= len(BBC_NEWS_LABELS)


def test_examples_are_well_formed(bbc):
    for name in SPLITS:
        for example in bbc[name]:
            assert set(example) == {"text", "label"}
            assert isinstance(example["text"], str) and example["text"].strip()
            assert isinstance(example["label"], int) and 0 <= example["label"] < len(BBC_NEWS_LABELS)


def test_latin1_article_keeps_its_pound_sign(bbc):
    texts = [e["text"] for name in SPLITS for e in bbc[name]]
    assert not any("\ufffd" in text for text in texts)
    assert any("\u00a315.8m" in text for text in texts)  # sports/199.txt is Latin-1


def test_splits_are_disjoint(bbc):
    # (label, text) pairs; the corpus has a few duplicate articles, so compare multisets
    counts = [Counter(_key(e) for e in bbc[name]) for name in SPLITS]
    everything = Counter(_key(e) for name in SPLITS for e in bbc[name])
    assert sum(everything.values()) == BBC_NEWS_SIZE
    assert sum(counts, Counter()) == everything
    # no article file lands in two splits: where a text is duplicated in the corpus it may, so compare with the
    # number of distinct files behind each text
    duplicated = {key for key, n in everything.items() if n > 1}
    for i in range(len(SPLITS)):
        for j in range(i + 1, len(SPLITS)):
            assert set(counts[i]) & set(counts[j]) <= duplicated


def test_splits_are_stratified(bbc):
    overall = Counter(e["label"] for name in SPLITS for e in bbc[name])
    assert len(overall) == len(BBC_NEWS_LABELS)
    for name in SPLITS:
        split = Counter(e["label"] for e in bbc[name])
        for label, count in overall.items():
            share, overall_share = split[label] / len(bbc[name]), count / BBC_NEWS_SIZE
            assert abs(share - overall_share) <= 0.02, (name, label, share, overall_share)


def test_split_is_deterministic_per_seed(bbc):
    again = load_bbc_news(seed=0)
    assert again == bbc
    other = load_bbc_news(seed=1)
    assert {name: len(other[name]) for name in SPLITS} == {name: len(bbc[name]) for name in SPLITS}
    for name in SPLITS:
        assert Counter(_key(e) for e in other[name]) != Counter(_key(e) for e in bbc[name])


def test_fractions_are_validated():
    with pytest.raises(ValueError, match="below 1"):
        load_bbc_news(validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        load_bbc_news(test_fraction=-0.1)


def test_default_model_path_has_a_config():
    import os

    assert os.path.isfile(os.path.join(default_model_path(), "config.json"))


class _WordTokenizer:
    """A stand-in tokenizer: one id per word, padded with 0 (the real one is tested in test_real_tokenizer)."""

    def __call__(self, texts, truncation, max_length, padding, return_tensors):
        assert truncation and padding == "max_length" and return_tensors == "pt"
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            words = [len(w) + 1 for w in text.split()][:max_length]
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
            mask[row, : len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_tokenize_classification_shapes():
    examples = [{"text": "a b c", "label": 2}, {"text": "one two three four five six", "label": 0}]
    encoded = tokenize_classification(_WordTokenizer(), examples, max_length=4)
    assert set(encoded) == {"input_ids", "attention_mask", "labels"}
    assert encoded["input_ids"].shape == encoded["attention_mask"].shape == (2, 4)
    assert encoded["labels"].tolist() == [2, 0] and encoded["labels"].dtype == torch.long
    assert encoded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_real_tokenizer(bbc):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    examples = bbc["validation"][:5]
    encoded = tokenize_classification(tokenizer, examples, max_length=32)
    assert encoded["input_ids"].shape == encoded["attention_mask"].shape == (5, 32)
    assert encoded["input_ids"].dtype == torch.long
    assert encoded["labels"].tolist() == [e["label"] for e in examples]
    assert (encoded["input_ids"][:, 0] == tokenizer.cls_token_id).all()


def test_batches_cover_everything_once():
    encoded = {"input_ids": torch.arange(10).unsqueeze(1).repeat(1, 3), "labels": torch.arange(10)}
    got = list(batches(encoded, batch_size=4, seed=0))
    assert [len(b["labels"]) for b in got] == [4, 4, 2]
    order = torch.cat([b["labels"] for b in got])
    assert sorted(order.tolist()) == list(range(10))
    for b in got:  # rows stay together
        assert torch.equal(b["input_ids"][:, 0], b["labels"])
    assert torch.equal(order, torch.cat([b["labels"] for b in batches(encoded, 4, seed=0)]))
    assert not torch.equal(order, torch.cat([b["labels"] for b in batches(encoded, 4, seed=1)]))
    in_order = torch.cat([b["labels"] for b in batches(encoded, 4, seed=0, shuffle=False)])
    assert in_order.tolist() == list(range(10))


def test_batches_reject_ragged_input():
    with pytest.raises(ValueError, match="different lengths"):
        list(batches({"a": torch.zeros(3), "b": torch.zeros(4)}, 2))
    with pytest.raises(ValueError, match="batch_size"):
        list(batches({"a": torch.zeros(3)}, 0))


def test_batch_stream_is_a_function_of_seed_and_index():
    encoded = {"labels": torch.arange(10), "input_ids": torch.arange(10)[:, None]}
    a, b = BatchStream(encoded, 4, seed=3), BatchStream(encoded, 4, seed=3)
    sequence = [a.batch(k)["labels"].tolist() for k in range(9)]
    assert [b.batch(k)["labels"].tolist() for k in reversed(range(9))] == sequence[::-1]
    assert sorted(sum(sequence[:3], [])) == list(range(10))  # one epoch: every example once
    assert sequence[:3] != sequence[3:6]  # reshuffled each epoch
    assert BatchStream(encoded, 4, seed=4).batch(0)["labels"].tolist() != sequence[0]
