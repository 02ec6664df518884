"""What the reference and layout tests share: tiny configs, a loss mask with holes, and
our :class:`Trainer` built several times in one spawned process.

Imported only inside spawned ranks (it imports megatron-core; ``gpt_mtp`` does not).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mtp_megatron.config import build_config
from mtp_megatron.data.iterator import GlobalBatchSampler
from mtp_megatron.runtime import distributed
from mtp_megatron.runtime.launch_env import read_launch_env
from mtp_megatron.training.trainer import Trainer
from tests.reference.gpt_mtp import ReferenceConfig
from tests.reference.mla import MLAReference
from tests.reference.moe import MoEReference

VOCAB = 128
TINY = dict(
    num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=48, seq_length=16, vocab_size=VOCAB, make_vocab_size_divisible_by=64,
    swiglu=True, micro_batch_size=2, global_batch_size=8, train_iters=5,
    lr=1e-3, min_lr=1e-3, lr_warmup_iters=0, lr_decay_style="constant",
    weight_decay=0.01, clip_grad=1.0, log_interval=1000, seed=1234,
    mtp_loss_scaling_factor=0.3, init_method_std=0.1, mock_data=True,
)


def tiny_config(world_size: int, output_dir: str, **overrides):
    """A validated RunConfig: 4 layers, h=32, GQA, SwiGLU, s=16, V=128 for TP <= 2."""
    values = dict(TINY, output_dir=output_dir)
    values.update(overrides)
    return build_config({}, values, world_size)


def reference_config(cfg, *, factor: Optional[float] = None,
                     depth_weights: Tuple[float, ...] = ()) -> ReferenceConfig:
    """The reference's view of ``cfg``; ``factor`` (default: --mtp-loss-scaling-factor)
    and ``depth_weights`` (default: uniform) are the test's own expectations."""
    return ReferenceConfig(
        num_layers=cfg.model.num_layers, hidden_size=cfg.model.hidden_size,
        num_attention_heads=cfg.model.num_attention_heads,
        num_query_groups=cfg.model.query_groups,
        mtp_num_layers=cfg.mtp.mtp_num_layers or 0,
        mtp_loss_scaling_factor=cfg.mtp.mtp_loss_scaling_factor if factor is None else factor,
        depth_weights=tuple(depth_weights),
        swiglu=cfg.model.swiglu,
        tied_embeddings=not cfg.model.untie_embeddings_and_output_weights,
        moe=moe_reference(cfg),
        mla=mla_reference(cfg),
    )


def mla_reference(cfg) -> Optional[MLAReference]:
    m = cfg.model
    if not m.multi_latent_attention:
        return None
    return MLAReference(
        q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_head_dim,
        pe_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
        latent_norms=m.qk_layernorm, rope_base=float(m.rotary_base),
        yarn=m.mla_rope_type == "yarn", factor=m.rotary_scaling_factor, mscale=m.mscale,
        mscale_all_dim=m.mscale_all_dim,
        original_max_positions=m.yarn_original_max_position_embeddings,
        beta_fast=m.yarn_beta_fast, beta_slow=m.yarn_beta_slow,
    )


def moe_reference(cfg) -> Optional[MoEReference]:
    m = cfg.model
    if not m.moe:
        return None
    return MoEReference(
        num_experts=m.num_experts, topk=m.moe_router_topk, layers=m.moe_layers,
        score_function=m.moe_router_score_function, pre_softmax=m.moe_router_pre_softmax,
        num_groups=m.moe_router_num_groups, group_topk=m.moe_router_group_topk,
        scaling=m.moe_router_topk_scaling_factor,
        balancing=m.moe_router_load_balancing_type, aux_coeff=m.moe_aux_loss_coeff,
        shared=bool(m.moe_shared_expert_intermediate_size),
    )


class HoleyDataset:
    """A dataset whose loss masks have holes that depend only on the sample index, so
    every layout sees the same holes; microbatches get different token counts."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = dict(self.dataset[index])
        seq = sample["loss_mask"].shape[0]
        positions = torch.arange(seq)
        holes = ((positions * 5 + index * 3) % 7 == 0) | (positions < index % 4)
        holes[seq - 1 - index % 3] = True  # sometimes inside the tail the MTP depths drop
        sample["loss_mask"] = sample["loss_mask"] * (~holes).to(sample["loss_mask"].dtype)
        return sample


def _initialize_in_place(cfg, launch, _original=distributed.initialize):
    """``distributed.initialize`` that rebuilds only the model-parallel groups when the
    process group already exists, so one spawned process can try several layouts."""
    if not dist.is_initialized():
        return _original(cfg, launch)
    par = cfg.parallel
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_size,
        context_parallel_size=par.context_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_size,
    )
    distributed.set_seeds(cfg.training.seed)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_trainer(cfg, transformer_impl: str = "local") -> Trainer:
    """Our Trainer for ``cfg``, its data given loss-mask holes (see HoleyDataset)."""
    distributed.initialize = _initialize_in_place
    trainer = Trainer(cfg, read_launch_env(os.environ), transformer_impl)
    old = trainer.sampler
    trainer.sampler = GlobalBatchSampler(
        HoleyDataset(old.dataset), micro_batch_size=old.micro_batch_size,
        global_batch_size=old.global_batch_size, dp_rank=old.dp_rank, dp_size=old.dp_size,
        consumed_samples=old.consumed_samples,  # a resumed run goes on where it stopped
    )
    return trainer


def global_batch(trainer: Trainer, step: int) -> List[Dict[str, torch.Tensor]]:
    """All microbatches of optimizer step ``step`` (1-based) as one rank would see them
    with DP = 1 (what the single-rank model and the reference consume)."""
    sampler = GlobalBatchSampler(
        trainer.sampler.dataset, micro_batch_size=trainer.sampler.micro_batch_size,
        global_batch_size=trainer.sampler.global_batch_size, dp_rank=0, dp_size=1,
        consumed_samples=(step - 1) * trainer.sampler.global_batch_size,
    )
    return sampler.next_step()


def before_optimizer_step(trainer: Trainer, callback: Callable[[int], None]) -> None:
    """Call ``callback(iteration)`` with the finalized gradients in ``main_grad``, just
    before each optimizer step (clipping later scales them in place). Hooks
    ``prepare_grads``, the first thing megatron-core's ``step()`` and our
    ``checked_optimizer_step`` call."""
    prepare = trainer.optimizer.prepare_grads

    def wrapped():
        callback(trainer.iteration + 1)
        return prepare()

    trainer.optimizer.prepare_grads = wrapped


def perturb(full: Dict[str, torch.Tensor], seed: int) -> Dict[str, torch.Tensor]:
    """Move norm gains off 1 and biases off 0 so every parameter changes the losses."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in full.items():
        noise = torch.randn(value.shape, generator=gen)
        if "norm" in key:
            value = value + 0.3 * noise
        elif key.endswith("bias"):
            value = value + 0.05 * noise
        out[key] = value
    return out


def finish(trainer: Optional[Trainer]) -> None:
    if trainer is not None:
        trainer.metrics.close()
