"""For the command-line tests: a tiny random BERT (and GPT-2) with a WordPiece tokenizer, a tiny random ViT with its
image processor, small CSV / JSONL / text files and image folders, and the check of a bad input's error."""

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


def make_tiny_vit(folder: pathlib.Path, seed: int = 0, head_labels=None) -> pathlib.Path:
    """A 2-layer, hidden-32 random ViT on 32 x 32 images with its image processor: without a classification head
    (as google/vit-base-patch16-224-in21k), or with one of ``head_labels`` outputs."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=head_labels or 2)
    (ViTModel(config) if head_labels is None else ViTForImageClassification(config)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# each class of the image tests: a colour the images are tinted with, so that classes can be learnt
IMAGE_CLASSES = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_image(path: pathlib.Path, colour, seed: int, size=(40, 36), mode: str = "RGB") -> pathlib.Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def write_image_folder(root: pathlib.Path, per_class: int = 10) -> pathlib.Path:
    """root/<class>/<i>.png, one folder per class of IMAGE_CLASSES (a grayscale JPEG among them: converted)."""
    for index, (name, colour) in enumerate(IMAGE_CLASSES.items()):
        for i in range(per_class):
            mode, suffix = ("L", "jpg") if i == 0 else ("RGB", "png")
            write_image(root / name / f"{i}.{suffix}", colour, seed=100 * index + i, mode=mode)
    return root


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
    """Runs the command; checks exit code 2, one error naming the problem (one line, or a first line counting the
    problems and one line each), no traceback and, when ``output`` is given, no output folder (validation comes
    before anything is created). Returns the error's text."""
    from spectral_peft_cli import main

    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("spectral-peft: error:")]
    assert len(errors) == 1, err
    error = "\n".join([lines[errors[0]]] + [line for line in lines[errors[0] + 1:] if line.startswith("  ")])
    assert message in error, error
    if output is not None:
        assert not output.exists(), "validation must come before anything is created"
    return error
