"""One training run of LoCA, S2FT or the FourierFT mode on a tiny BERT, under torchrun (DistributedDataParallel or
FSDP2's fully_shard, gloo) or alone.

Written against the public API only, as a user's script would be:

    torchrun --nproc_per_node 2 tests/distributed/ddp_worker.py --method loca --output OUT
    python tests/distributed/ddp_worker.py --method loca --output OUT          # one process, same global batch
    accelerate launch --multi_gpu --num_processes 2 tests/distributed/ddp_worker.py --method loca --accelerate \
        --output OUT    # accelerate's Accelerator(cpu=True) and prepare() (gloo, DistributedDataParallel) on CPU
    torchrun --nproc_per_node 2 tests/distributed/ddp_worker.py --method loca --fsdp2 --output OUT

Every rank writes ``OUT/rank<R>.pt``: the loss of every step (the mean over the global batch), the adapter state and
the cells of every LoCA layer. Rank 0 also saves the adapter (``OUT/adapter``) and the logits it gives on a fixed
batch (``OUT/logits.pt``).
"""

from __future__ import annotations

import argparse
import os
import pathlib

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification

import spectral_peft

GLOBAL_BATCH, SEQ_LEN, VOCAB, STEPS = 8, 8, 100, 60


def build_base() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def global_batch(step: int) -> dict:
    """The same global batch on every rank: a learnable task (the label is a function of the first token)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}


def shard(batch: dict, rank: int, world: int) -> dict:
    size = GLOBAL_BATCH // world
    return {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}


def loca_cells(model) -> dict:
    return {name: m.loca_cells["default"].clone() for name, m in model.named_modules()
            if isinstance(m, spectral_peft.loca.LocaLinear)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=("loca", "s2ft", "fastfourierft"), required=True)
    parser.add_argument("--prior", choices=("gradient", "lora"), default="gradient")
    parser.add_argument("--output", required=True)
    parser.add_argument("--accelerate", action="store_true", help="set up and wrap with accelerate's Accelerator")
    parser.add_argument("--fsdp2", action="store_true", help="shard with FSDP2's fully_shard instead of DDP")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)  # under a launcher: MULTI_CPU, it starts the gloo process group
    elif "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    output = pathlib.Path(args.output)

    common = dict(target_modules=["query", "value"], n_frequency=64, modules_to_save=["classifier"])
    if args.method == "loca":
        config = spectral_peft.LocaConfig(coefficient_steps=3, location_steps=5, location_learning_steps=40,
                                          location_seed=0, **common)
        model = get_peft_model(build_base(), config)
    elif args.method == "fastfourierft":
        model = get_peft_model(build_base(), spectral_peft.FastFourierFTConfig(init_weights=True, **common))
    else:
        config = spectral_peft.S2FTConfig(prior=args.prior, prior_batches=2, prior_steps=5, **common)
        prior_batches = [shard(global_batch(-1 - i), rank, world) for i in range(2)]
        model = spectral_peft.prepare_s2ft(build_base(), config, prior_batches)
    initial_cells = loca_cells(model)
    model.train()
    fsdp2 = args.fsdp2 and distributed
    if fsdp2:  # before the optimizer: fully_shard replaces the parameters by their shards
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if args.method == "loca":
        groups = spectral_peft.loca_param_groups(model, lr=1e-2, location_lr=0.5)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "lr": 1e-3 if args.method == "fastfourierft" else 1e-2}]
    optimizer = torch.optim.Adam(groups)
    if accelerator is not None:
        trained, optimizer = accelerator.prepare(model, optimizer)
        if distributed:  # what accelerate made of the launch: gloo on CPU, the model in DistributedDataParallel
            assert accelerator.distributed_type.name == "MULTI_CPU", accelerator.distributed_type
            assert isinstance(trained, DistributedDataParallel) and dist.get_backend() == "gloo"
    elif fsdp2:
        trained = model
    else:
        trained = DistributedDataParallel(model) if distributed else model  # default arguments, as accelerate uses
    schedule = spectral_peft.LocaSchedule(trained) if args.method == "loca" else None

    losses = []
    for step in range(STEPS):
        loss = trained(**shard(global_batch(step), rank, world)).loss
        accelerator.backward(loss) if accelerator is not None else loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if schedule is not None:
            schedule.step()
        mean = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))

    # FSDP2 holds each rank's shard of a parameter: the whole one is gathered (a collective, on every rank)
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}
    state = {k: v for k, v in full.items() if "base_layer" not in k}
    output.mkdir(parents=True, exist_ok=True)
    torch.save({"losses": losses, "state": state, "cells": loca_cells(model), "initial_cells": initial_cells},
               output / f"rank{rank}.pt")
    model.eval()
    with torch.no_grad():  # under FSDP2 every rank takes part in a forward pass
        logits = model(input_ids=global_batch(10_000)["input_ids"]).logits if fsdp2 or rank == 0 else None
    if rank == 0:
        # PEFT's save takes the gathered state under FSDP2 (its own state_dict() call would gather on rank 0 alone)
        model.save_pretrained(output / "adapter", state_dict=full if fsdp2 else None)
        torch.save(logits, output / "logits.pt")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
