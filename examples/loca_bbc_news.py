"""LoCA on BBC News topic classification with all-MiniLM-L6-v2: the `make demo` job.

Runs offline (HF_HUB_OFFLINE=1) with the model and data shipped as PyPI packages: a few minutes
on a 2-core CPU. It trains LoCA on the query and value projections plus the classification head for ``--steps``
optimizer steps, shows the loss falling and the validation accuracy before and after, how many LoCA locations
moved, the trainable parameter count and the size of the saved adapter, and checks that the saved adapter
reloads to the same predictions.

    python examples/loca_bbc_news.py [--steps 60] [--n-frequency 1000] [--output outputs/demo-loca]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

import spectral_peft  # noqa: E402  (registers LoCA with PEFT)
from spectral_peft.loca import LocaLinear  # noqa: E402
from spectral_peft.tools.data import (  # noqa: E402
    BBC_NEWS_LABELS,
    BatchStream,
    batches,
    default_model_path,
    load_bbc_news,
    tokenize_classification,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--n-frequency", type=int, default=1000, help="LoCA coefficients per matrix (default 1000)")
    parser.add_argument("--output", default="outputs/demo-loca", help="where the adapter is saved")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3, help="LoCA coefficients' learning rate")
    parser.add_argument("--head-lr", type=float, default=5e-3, help="classification head's learning rate")
    parser.add_argument("--location-lr", type=float, default=0.1, help="LoCA locations' learning rate (cells/step)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-examples", type=int, default=200, help="validation examples evaluated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error("--steps must be positive")
    return args


@torch.no_grad()
def accuracy(model, encoded: dict, batch_size: int = 32) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for batch in batches(encoded, batch_size, shuffle=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(encoded["labels"])


def loca_cells(model) -> dict[str, torch.Tensor]:
    """The cells in use by every LoCA layer, (2, n) long each."""
    return {
        name: module.commit_locations("default").clone()
        for name, module in model.named_modules() if isinstance(module, LocaLinear)
    }


def param_groups(model, lr: float, head_lr: float, location_lr: float) -> list[dict]:
    """loca_param_groups, with the modules_to_save head split into a group of its own learning rate."""
    groups = spectral_peft.loca_param_groups(model, lr=lr, location_lr=location_lr)
    head_ids = {id(p) for name, p in model.named_parameters() if p.requires_grad and "modules_to_save" in name}
    rest = groups[0]
    head = [p for p in rest["params"] if id(p) in head_ids]
    rest["params"] = [p for p in rest["params"] if id(p) not in head_ids]
    return groups + ([{"params": head, "lr": head_lr, "weight_decay": 0.0}] if head else [])


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    transformers_logging.set_verbosity_error()  # the "classifier is newly initialised" report is expected
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    model_path = args.model or default_model_path()
    data = load_bbc_news(seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = tokenize_classification(tokenizer, data["train"], args.max_length)
    validation = tokenize_classification(tokenizer, data["validation"][: args.eval_examples], args.max_length)
    print(f"BBC News: {len(data['train'])} train / {len(data['validation'])} validation / {len(data['test'])} test "
          f"articles, {len(BBC_NEWS_LABELS)} topics; evaluating on {len(validation['labels'])} validation articles")

    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(BBC_NEWS_LABELS))
    config = spectral_peft.LocaConfig(
        target_modules=["query", "value"], n_frequency=args.n_frequency, modules_to_save=["classifier"],
        coefficient_steps=10, location_steps=20, location_learning_steps=int(0.3 * args.steps),
        location_seed=args.seed, task_type="SEQ_CLS",
    )
    model = get_peft_model(base, config)
    trainable = {"LoCA coefficients": 0, "LoCA locations": 0, "classifier head": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            kind = "LoCA coefficients" if "loca_coefficients" in name else "LoCA locations" if "loca_locations" in name else "classifier head"
            trainable[kind] += param.numel()
    total_params = sum(p.numel() for p in model.parameters())
    n_layers = sum(isinstance(m, LocaLinear) for m in model.modules())
    print(f"LoCA on {n_layers} matrices (query, value x {n_layers // 2} layers), n_frequency={args.n_frequency}; "
          f"trained parameters: {trainable['LoCA coefficients'] + trainable['classifier head']:,} of {total_params:,} "
          f"(LoCA coefficients {trainable['LoCA coefficients']:,}, classifier head {trainable['classifier head']:,}; "
          f"plus {trainable['LoCA locations']:,} location floats, positions rather than weights, counted apart)")

    optimizer = torch.optim.Adam(param_groups(model, args.lr, args.head_lr, args.location_lr))
    schedule = spectral_peft.LocaSchedule(model, total_steps=args.steps)
    initial_cells = loca_cells(model)

    evaluations = [(0, accuracy(model, validation))]
    print(f"validation accuracy before training: {evaluations[0][1]:.3f}")

    model.train()
    train_started, eval_seconds = time.perf_counter(), 0.0
    losses, phases = [], []
    data, epoch, stream = BatchStream(train, args.batch_size, seed=args.seed), 0, iter(())
    progress = tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True)
    for step in progress:
        batch = next(stream, None)
        if batch is None:  # a new epoch, reshuffled
            stream = data.epoch(epoch)
            epoch += 1
            batch = next(stream)
        phase = schedule.phase()  # what this step trains
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        phases.append(phase)
        progress.set_postfix(loss=f"{loss.item():.3f}", phase=phase)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            eval_started = time.perf_counter()
            evaluations.append((step + 1, accuracy(model, validation)))
            eval_seconds += time.perf_counter() - eval_started
            progress.write(f"step {step + 1}: validation accuracy {evaluations[-1][1]:.3f}")
    progress.close()
    train_seconds = time.perf_counter() - train_started - eval_seconds
    print(f"training: {train_seconds:.0f} s ({train_seconds / args.steps:.2f} s/step), evaluations {eval_seconds:.0f} s")

    window = max(1, min(10, args.steps // 6))
    print(f"\n{'steps':>9}  {'mean loss':>9}  phases")
    for start in range(0, args.steps, window):
        chunk = slice(start, min(start + window, args.steps))
        names = sorted(set(phases[chunk]), key=phases[chunk].index)
        print(f"{start + 1:>4}-{chunk.stop:<4}  {sum(losses[chunk]) / len(losses[chunk]):>9.4f}  {'/'.join(names)}")

    print("\nvalidation accuracy: " + ", ".join(f"step {s}: {a:.3f}" for s, a in evaluations))
    print(f"before {evaluations[0][1]:.3f} -> after {evaluations[-1][1]:.3f}")

    final_cells = loca_cells(model)
    moved = sum(int((final_cells[k] != initial_cells[k]).any(0).sum()) for k in final_cells)
    total_locations = sum(c.shape[1] for c in final_cells.values())
    location_steps = phases.count("locations")
    print(f"LoCA locations moved: {moved} of {total_locations} ({100 * moved / total_locations:.1f}%) "
          f"in {location_steps} location steps")

    output = pathlib.Path(args.output)
    model.save_pretrained(output)
    files = sorted(p for p in output.rglob("*") if p.is_file())
    weights = output / "adapter_model.safetensors"
    print(f"adapter saved to {output}: adapter_model.safetensors {weights.stat().st_size:,} bytes "
          f"({sum(p.stat().st_size for p in files):,} bytes in {len(files)} files)")

    # the saved adapter is the trained model: reload it on a fresh base and compare predictions
    probe = {k: v[:8] for k, v in validation.items()}
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        fresh = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(BBC_NEWS_LABELS))
        reloaded = PeftModel.from_pretrained(fresh, output).eval()
        got = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    difference = (got - expected).abs().max().item()
    print(f"reloaded adapter reproduces the logits: max |difference| = {difference:.2e}")
    if difference > 1e-4:
        raise SystemExit(f"the reloaded adapter differs from the trained model (max |difference| {difference:.2e})")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
