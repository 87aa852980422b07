"""LoCA, S2FT and the FourierFT mode under real torch.distributed: torchrun, 2 processes, gloo on CPU,
DistributedDataParallel with its default arguments or FSDP2's fully_shard, 60 steps through LoCA's location phases
(the worker script is written against the public API)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from .ddp_worker import build_base, global_batch

WORKER = pathlib.Path(__file__).with_name("ddp_worker.py")
# the S2FT LoRA prior is rank 0's warm-up on its half of each batch, another prior than one process would make, so
# that run is compared across ranks only
RUNS = {"loca": ("--method", "loca"), "s2ft-gradient-prior": ("--method", "s2ft", "--prior", "gradient"),
        "s2ft-lora-prior": ("--method", "s2ft", "--prior", "lora"),
        # accelerate launch with a CPU config (--cpu, or distributed_type MULTI_CPU) starts one process unless it
        # is given an MPI hostfile (mpirun); --multi_gpu starts torch.distributed.run's processes, and on a machine
        # without GPUs the script's Accelerator(cpu=True) makes them MULTI_CPU with gloo
        "loca-accelerate": ("--method", "loca", "--accelerate"),
        # FSDP2 shards every parameter (LoCA's locations too) between steps; the schedule moves them on the whole
        "loca-fsdp2": ("--method", "loca", "--fsdp2"),
        "s2ft-fsdp2": ("--method", "s2ft", "--prior", "gradient", "--fsdp2"),
        "fastfourierft-fsdp2": ("--method", "fastfourierft", "--fsdp2")}
LAUNCHERS = {"torchrun": ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node=2"],
             "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]}
_done: dict = {}


def launch(output: pathlib.Path, args: tuple, processes: int = 0) -> dict:
    launcher = LAUNCHERS["accelerate" if "--accelerate" in args else "torchrun"] if processes else []
    argv = [sys.executable, *launcher, str(WORKER), *args, "--output", str(output)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {rank: torch.load(output / f"rank{rank}.pt", weights_only=False) for rank in range(max(processes, 1))}


def runs(name: str, tmp_path_factory) -> dict:
    """The 2-process run of RUNS[name] (and, but for the LoRA prior, the one-process run), made once."""
    if name not in _done:
        root = tmp_path_factory.mktemp(name)
        single = None if name == "s2ft-lora-prior" else launch(root / "single", RUNS[name])[0]
        _done[name] = {"root": root, "ranks": launch(root / "ddp", RUNS[name], processes=2), "single": single}
    return _done[name]


@pytest.mark.parametrize("name", RUNS)
def test_every_rank_holds_the_same_adapter(name, tmp_path_factory):
    first, second = runs(name, tmp_path_factory)["ranks"].values()
    assert first["state"].keys() == second["state"].keys()
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key
    for layer, cells in first["cells"].items():
        assert torch.equal(cells, second["cells"][layer]), layer
    if name.startswith("loca"):  # the run went through location phases and locations moved
        moved = sum(int((cells != first["initial_cells"][layer]).any(dim=0).sum())
                    for layer, cells in first["cells"].items())
        assert moved > 0


@pytest.mark.parametrize("name", ["loca", "s2ft-gradient-prior", "loca-accelerate", "loca-fsdp2", "s2ft-fsdp2",
                                  "fastfourierft-fsdp2"])
def test_the_loss_follows_one_process_with_the_same_global_batch(name, tmp_path_factory):
    run = runs(name, tmp_path_factory)
    ddp = torch.tensor(run["ranks"][0]["losses"], dtype=torch.float64)
    single = torch.tensor(run["single"]["losses"], dtype=torch.float64)
    assert len(ddp) == len(single) == 60
    relative = ((ddp - single).abs() / single.abs()).max().item()
    print(f"\n{name}: largest relative loss difference over 60 steps {relative:.2e}")
    assert relative < 1e-4
    assert single[-10:].mean() < single[:10].mean()  # it trained
    # locations round to cells, so a float difference of the order of the summation's can flip one cell (1 of 256
    # measured); nearly all must end on the same cells as one process's
    ranks, one = run["ranks"][0]["cells"], run["single"]["cells"]
    differ = sum(int((cells != one[layer]).any(dim=0).sum()) for layer, cells in ranks.items())
    total = sum(cells.shape[1] for cells in ranks.values())
    assert differ <= 0.02 * total, f"{differ} of {total} cells differ"


@pytest.mark.parametrize("name", RUNS)
def test_the_adapter_saved_by_rank_0_reproduces_its_outputs(name, tmp_path_factory):
    root = runs(name, tmp_path_factory)["root"]
    loaded = PeftModel.from_pretrained(build_base(), root / "ddp" / "adapter").eval()
    with torch.no_grad():
        logits = loaded(input_ids=global_batch(10_000)["input_ids"]).logits
    assert torch.equal(logits, torch.load(root / "ddp" / "logits.pt"))
