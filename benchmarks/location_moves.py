"""Do LoCA's location gradients point to better cells? One measurement on a trained LoCA adapter.

    python benchmarks/location_moves.py --adapter runs/ablations/grid/cells/loca-n1000-seed0 [--draws 5]

On the run's whole training split (eval mode, no dropout), the adapter's location gradient is computed once; then
every coefficient is moved one cell at once, (a) along the axis and in the direction the gradient says (the move a
location phase makes), (b) the opposite way, (c) in a random direction (``--draws`` draws), keeping each coefficient's
value. It prints the training loss before and after each move, and the first-order change the gradient predicts for
(a). If the gradient carries information, (a) lowers the loss more than (c), and (b) raises it.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a finished LoCA run folder (spectral-peft finetune)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import PeftModel

    from spectral_peft.loca import LocaLinear
    from spectral_peft.tools.models import load_base_model, load_tokenizer, quiet_libraries, resolve_model
    from spectral_peft.tools.tasks import encode_task, load_task

    quiet_libraries(args.threads)
    folder = pathlib.Path(args.adapter)
    run = json.loads((folder / "run.json").read_text())
    # the run's own columns and encoding, as evaluate reads them
    task = load_task(run["task"], run["seed"], run["val_fraction"], run["test_fraction"], run["settings"])
    info = resolve_model(run["model_arg"])
    tokenizer = load_tokenizer(info)
    train = encode_task(task, tokenizer, run["max_length"], run["seed"], run["val_fraction"], run["test_fraction"])["train"]
    base = load_base_model(info, run["task_kind"], run["num_labels"], tokenizer, run["label_names"])
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=True).eval()
    layers = [m for m in model.modules() if isinstance(m, LocaLinear)]

    def loss() -> float:
        with torch.no_grad():
            return float(model(**train).loss)

    for layer in layers:
        layer.set_phase("default", False, True)
    model.zero_grad()
    model(**train).loss.backward()
    start = {id(layer): layer.loca_cells["default"].clone() for layer in layers}
    grads = {id(layer): layer.loca_locations["default"].grad.clone() for layer in layers}

    def move(direction: str, generator=None) -> tuple[float, float, float]:
        """Move every coefficient one cell; returns (loss after, share moved, first-order predicted change)."""
        predicted, moved, total = 0.0, 0, 0
        for layer in layers:
            cells, grad = start[id(layer)], grads[id(layer)]
            step = torch.zeros_like(cells)
            if direction == "random":
                axis = torch.randint(0, 2, (cells.shape[1],), generator=generator)
                sign = torch.randint(0, 2, (cells.shape[1],), generator=generator) * 2 - 1
            else:
                axis = grad.abs().argmax(0)
                sign = -torch.sign(grad[axis, torch.arange(cells.shape[1])]).long()
                sign[sign == 0] = 1
                if direction == "against":
                    sign = -sign
            step[axis, torch.arange(cells.shape[1])] = sign
            with torch.no_grad():
                layer.loca_locations["default"].copy_((cells + step).float())
                layer.loca_cells["default"].copy_(cells)
                new = layer.commit_locations("default")
            taken = (new != cells).any(0)
            moved += int(taken.sum())
            total += cells.shape[1]
            predicted += float((grad * (new - cells).float()).sum())
        after = loss()
        for layer in layers:  # back to the start
            with torch.no_grad():
                layer.loca_cells["default"].copy_(start[id(layer)])
                layer.loca_locations["default"].copy_(start[id(layer)].float())
        return after, moved / total, predicted

    before = loss()
    print(f"{folder}: training loss {before:.5f} on {len(train['labels'])} examples")
    after, share, predicted = move("gradient")
    print(f"  along the gradient: {after:.5f} ({after - before:+.5f}; first-order prediction {predicted:+.5f}; "
          f"{share:.1%} moved)")
    after, share, _ = move("against")
    print(f"  against it:         {after:.5f} ({after - before:+.5f}; {share:.1%} moved)")
    generator = torch.Generator().manual_seed(0)
    changes = [move("random", generator)[0] - before for _ in range(args.draws)]
    print(f"  random directions:  {' '.join(f'{c:+.5f}' for c in changes)}")


if __name__ == "__main__":
    main()
