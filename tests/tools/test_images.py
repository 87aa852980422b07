"""Image classification from the command line: a folder of images (one subfolder per class) or a CSV of image paths,
a tiny random ViT with its image processor, every method through finetune, evaluate and compare; bad images are
told one line each, before anything is written."""

from __future__ import annotations

import json

import pytest

from spectral_peft_cli import main

from .cli_support import (
    IMAGE_CLASSES,
    bad_input,
    make_tiny_bert,
    make_tiny_vit,
    write_csv,
    write_image,
    write_image_folder,
)

LOOP = ["--steps", "3", "--batch-size", "6", "--eval-every", "0", "--prior-batches", "1", "--threads", "1", "--quiet"]
FAST = LOOP + ["--n-frequency", "16", "--rank", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {"vit": str(make_tiny_vit(root / "vit")), "photos": str(write_image_folder(root / "photos")),
            "root": root}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method", ["loca", "s2ft", "fourierft", "fastfourierft", "lora", "full"])
def test_an_image_folder_trains_a_vit_and_evaluate_reproduces_it(capsys, files, tmp_path, method):
    output = tmp_path / method
    code, out, err = run(capsys, "finetune", "--method", method, "--model", files["vit"], "--task", files["photos"],
                         *FAST, "--output", output)
    assert code == 0, err
    assert "test: accuracy" in out and "(base model (fresh head): accuracy" in out
    metrics = json.loads((output / "metrics.json").read_text())
    run_info = json.loads((output / "run.json").read_text())
    assert metrics["task_kind"] == "image-classification" and run_info["label_names"] == sorted(IMAGE_CLASSES)
    assert metrics["examples"] == {"train": 21, "validation": 3, "test": 6}  # 10 per class: 7 / 1 / 2
    assert set(metrics["test"]) == {"accuracy", "macro_f1", "loss", "examples"}
    assert metrics["base"]["fresh_head"] and set(metrics["base"]) == {"fresh_head", "validation", "test"}
    if method != "full":
        config = json.loads((output / "adapter_config.json").read_text())
        # the attention's query and value projections by this transformers' names; the head saved once
        assert sorted(config["target_modules"]) in (["q_proj", "v_proj"], ["query", "value"])
        assert config["modules_to_save"] == ["classifier"]
        assert metrics["head_params"] == 32 * 3 + 3
    code, out, err = run(capsys, "evaluate", "--adapter", output, "--threads", "1")
    assert code == 0, out + err
    assert out.count(" yes") == 3


def test_compare_prints_the_methods_beside_the_base_models_accuracy(capsys, files, tmp_path):
    code, out, err = run(capsys, "compare", "--methods", "loca,lora", "--budgets", "16", "--ranks", "2",
                         "--model", files["vit"], "--task", files["photos"], *LOOP, "--output", tmp_path,
                         "--in-process")
    assert code == 0, err
    table = out.splitlines()
    assert table[2].startswith("| base model (fresh head) | - |")
    assert any(line.startswith("| loca | n16 |") for line in table)
    assert any(line.startswith("| lora | r2 |") for line in table)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "accuracy" and results["base"]["seeds"] == [0]
    # one cell per seed measures the base model; the others skip it
    assert [c.get("base") is not None for c in results["cells"]] == [True, False]


def test_a_csv_of_image_paths(capsys, files, tmp_path):
    rows = []
    for index, (name, colour) in enumerate(IMAGE_CLASSES.items()):
        for i in range(6):
            path = write_image(tmp_path / "pictures" / f"{name}{i}.png", colour, seed=10 * index + i)
            rows.append({"image": f"pictures/{path.name}", "label": name,
                         "split": ["train", "train", "train", "train", "validation", "test"][i]})
    table = write_csv(tmp_path / "images.csv", rows, columns=("image", "label", "split"))
    output = tmp_path / "run"
    code, out, err = run(capsys, "finetune", "--method", "lora", "--model", files["vit"], "--task", table, *FAST,
                         "--output", output)
    assert code == 0, err
    assert json.loads((output / "metrics.json").read_text())["examples"] == {"train": 12, "validation": 3,
                                                                             "test": 3}
    rows[4]["image"] = "pictures/missing.png"
    write_csv(table, rows, columns=("image", "label", "split"))
    bad_input(capsys, ["finetune", "--method", "lora", "--model", files["vit"], "--task", table, *FAST, "--output",
                       tmp_path / "other"], tmp_path / "other", "line 6: image file not found: pictures/missing.png")


def test_bad_images_are_told_one_line_each(capsys, files, tmp_path):
    from PIL import Image

    photos = write_image_folder(tmp_path / "photos", per_class=3)
    (photos / "red" / "broken.png").write_bytes(b"this is not a png")
    Image.new("I;16", (8, 8)).save(photos / "green" / "deep.png")
    (photos / "yellow").mkdir()
    (photos / "yellow" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    error = bad_input(capsys, ["finetune", "--method", "lora", "--model", files["vit"], "--task", photos, *FAST,
                               "--output", out], out, "3 problems:")
    lines = error.splitlines()[1:]
    assert len(lines) == 3
    assert any("yellow: empty class folder" in line for line in lines)
    assert any("broken.png: not an image file PIL can read" in line for line in lines)
    assert any("deep.png: pixels of mode I;16 (16-bit or floating point)" in line for line in lines)


def test_an_image_task_needs_an_image_model_and_a_text_task_a_text_one(capsys, files, tmp_path):
    bert = make_tiny_bert(tmp_path / "bert")
    out = tmp_path / "out"
    bad_input(capsys, ["finetune", "--method", "lora", "--model", bert, "--task", files["photos"], *FAST,
                       "--output", out], out, "holds images but model")
    table = write_csv(tmp_path / "d.csv", [{"text": "a cat", "label": "x"}, {"text": "a dog", "label": "y"}] * 10)
    bad_input(capsys, ["finetune", "--method", "lora", "--model", files["vit"], "--task", table, *FAST,
                       "--output", out], out, "holds text but model")


@pytest.mark.parametrize("head_labels, fresh", [(None, True), (5, True), (3, False)])
def test_the_base_model_is_labelled_by_whether_its_head_is_fresh(capsys, files, tmp_path, head_labels, fresh):
    """A ViT without a head, or with one of another size, gets a fresh head; one with the task's size keeps its."""
    vit = make_tiny_vit(tmp_path / "vit", head_labels=head_labels)
    output = tmp_path / "run"
    code, out, err = run(capsys, "finetune", "--method", "lora", "--model", vit, "--task", files["photos"], *FAST,
                         "--output", output)
    assert code == 0, err
    assert json.loads((output / "metrics.json").read_text())["base"]["fresh_head"] is fresh
    assert ("(base model (fresh head): accuracy" in out) is fresh
