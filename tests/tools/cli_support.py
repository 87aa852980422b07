"""For the command-line tests: a tiny random BERT (and GPT-2) with a WordPiece tokenizer, small CSV / JSONL / text
files, and the check of a bad input's one error line."""

from __future__ import annotations

import csv
import inspect
import json
import pathlib
import random

WORDS = {
    "animals": ["cat", "dog", "horse", "cow", "bird", "fish"],
    "colors": ["red", "blue", "green", "yellow", "pink", "black"],
    "numbers": ["one", "two", "three", "four", "five", "six"],
}
FILLER = ["the", "a", "is", "and", "very", "of", "in", "my"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocabulary() -> list[str]:
    return SPECIALS + FILLER + [w for words in WORDS.values() for w in words]


def make_tokenizer(folder: pathlib.Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(vocabulary()) + "\n")
    # transformers 5 names the argument `vocab` (vocab_file is ignored there); 4.x names it `vocab_file`
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    else:
        tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids("cat") != tokenizer.unk_token_id, "the tiny tokenizer lost its vocabulary"
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_tiny_bert(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A 2-layer, hidden-32 random BertModel saved with save_pretrained, plus its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocabulary()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def make_tiny_gpt2(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A 2-layer random GPT-2 (decoder) with the same WordPiece tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(vocabulary()), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def examples(per_label: int = 20, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, words in WORDS.items():
        for _ in range(per_label):
            text = rng.sample(words, 3) + rng.sample(FILLER, 3)
            rng.shuffle(text)
            rows.append({"text": " ".join(text), "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: pathlib.Path, rows: list[dict], columns=("text", "label")) -> pathlib.Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_text(path: pathlib.Path, words: int = 3000, seed: int = 0) -> pathlib.Path:
    rng = random.Random(seed)
    vocab = [w for words_ in WORDS.values() for w in words_] + FILLER
    path.write_text(" ".join(rng.choice(vocab) for _ in range(words)))
    return path


# a finetune of a few steps on the tiny models: enough to reach every check of the input
FAST = ["--steps", "2", "--batch-size", "8", "--max-length", "16", "--n-frequency", "8", "--threads", "1", "--quiet"]


def finetune_argv(model, task, output, *extra) -> list:
    return ["finetune", "--method", "lora", "--model", model, "--task", task, *FAST, "--output", output, *extra]


def bad_input(capsys, argv, output, message: str) -> str:
    """Runs the command; checks exit code 2, one error line naming the problem, no traceback and, when ``output``
    is given, no output folder (validation comes before anything is created). Returns the error line."""
    from spectral_peft_cli import main

    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("spectral-peft: error:")]
    assert len(errors) == 1, err
    assert message in errors[0], errors[0]
    if output is not None:
        assert not output.exists(), "validation must come before anything is created"
    return errors[0]
