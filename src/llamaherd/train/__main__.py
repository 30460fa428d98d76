"""`torchrun --nproc_per_node N -m llamaherd.train sft|dpo|reward|pretrain ...`: the arguments of
`herd train sft|dpo|reward|pretrain`.

Each process joins the group (gloo on the CPU, NCCL on GPUs); the recipe shards the model with
FSDP2 and gives each process its share of every global batch. Only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from ..cli.pretrain import register_verbs
from ..cli.reward import REWARD_BOOLS, REWARD_FLAGS, cmd_train_reward
from ..cli.train import DPO_BOOLS, DPO_FLAGS, add_sft_arguments, cmd_dpo, cmd_sft
from ..errors import HerdError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamaherd.train")
    verbs = parser.add_subparsers(dest="verb", required=True)
    sft = verbs.add_parser("sft")
    add_sft_arguments(sft)
    sft.set_defaults(func=cmd_sft)
    for verb, flags, bools, func in (("dpo", DPO_FLAGS, DPO_BOOLS, cmd_dpo),
                                     ("reward", REWARD_FLAGS, REWARD_BOOLS, cmd_train_reward)):
        p = verbs.add_parser(verb)
        add_sft_arguments(p, flags, bools)
        p.set_defaults(func=func)
    register_verbs(verbs)  # pretrain (scaling too, though it runs one process)
    args = parser.parse_args(argv)
    args.nproc = 1  # already launched
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    quiet = distributed and dist.get_rank() != 0
    try:
        if quiet:
            sys.stdout = open(os.devnull, "w")
        return args.func(args)
    except HerdError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
