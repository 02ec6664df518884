"""Pretrain a GPT with multi-token prediction on megatron-core.

CPU or one GPU (a small model, about two minutes on 2 CPU cores):
    torchrun launch/pretrain_gpt_mtp.py --mtp-num-layers 1
Two ranks (data parallel on CPU/gloo, or two GPUs):
    torchrun --nproc-per-node 2 launch/pretrain_gpt_mtp.py --mtp-num-layers 1
Tensor x pipeline parallel with a config file and overrides:
    torchrun --nproc-per-node 4 launch/pretrain_gpt_mtp.py --config examples/tp2_pp2_mtp2.yaml \
        --train-iters 50
Plan a 1,024-GPU run without starting it:
    python launch/pretrain_gpt_mtp.py --config examples/tp2_pp2_mtp2.yaml \
        --world-size 1024 --dry-run
SLURM, one task per GPU inside an NGC container (see docs/cluster.md):
    launch/slurm/submit.sh --mode srun --nodes 16 --gpus-per-node 8 --config my.yaml \
        -- --bf16 --mtp-num-layers 1
"""

import sys

from mtp_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main())
