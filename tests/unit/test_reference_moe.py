"""megatron-core's MoE + MTP (through our Trainer) against the pure-PyTorch reference.

One spawned CPU rank runs one training step per case on a single-rank MoE model (norm
gains, biases and the expert biases moved off their initial values, a loss mask with
holes) and compares with ``tests/reference`` (router + experts in ``moe.py``): the logged
lm and ``mtp_k`` losses, the logged balancing loss, and the gradient that reached
``main_grad``, which must be that of ``lm + factor / D * sum_k mtp_k + sum over MoE layers
(MTP layers included) of coeff x balancing loss``, averaged over micro-batches. The same
gradient without the balancing term, and the losses with the expert bias ignored, are
measurably different: the match is not a coincidence. The ``mla`` case is ``dsv3`` with
multi-latent attention and YaRN (``tests/reference/mla.py``).
"""

from __future__ import annotations

import pytest

from tests.dist_utils import spawn

pytestmark = pytest.mark.multirank

LOSS_TOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4

MOE = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, moe_aux_loss_coeff=0.05)
MLA = dict(num_query_groups=None, multi_latent_attention=True, q_lora_rank=16,
           kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=8,
           qk_layernorm=True, rotary_scaling_factor=4.0, mscale=0.9, mscale_all_dim=0.7,
           yarn_original_max_position_embeddings=64)
CASES = {
    # DeepSeek-V3 shape: first layer dense, sigmoid + expert bias, groups, shared expert,
    # sequence-wise balancing loss, scaled weights, one MTP layer (MoE); one micro-batch
    "dsv3": dict(MOE, moe_layer_freq="[0]*1+[1]*3", moe_shared_expert_intermediate_size=16,
                 moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                 moe_router_num_groups=2, moe_router_group_topk=1,
                 moe_router_topk_scaling_factor=2.0,
                 moe_router_load_balancing_type="seq_aux_loss", mtp_num_layers=1,
                 global_batch_size=2),
    # softmax top-2 with the micro-batch balancing loss, all layers MoE, D=2, 4 micro-batches
    "softmax": dict(MOE, moe_router_load_balancing_type="aux_loss", mtp_num_layers=2,
                    global_batch_size=8),
}
# The dsv3 case with multi-latent attention (tests/reference/mla.py): query latent with
# its norm, YaRN stretched by 4 with both mscales (softmax scale and cos/sin multiplier)
CASES["mla"] = dict(CASES["dsv3"], **MLA)


def _grad_error(mine, ref):
    worst, where = 0.0, None
    for name, g in mine.items():
        r = ref[name] if ref[name] is not None else g * 0
        excess = ((g - r).abs() / (GRAD_ATOL + GRAD_RTOL * r.abs())).max().item()
        if excess > worst:
            worst, where = excess, name
    return worst, where


def _run_cases(rank, world_size, output_dir):
    import dataclasses

    import torch

    from mtp_megatron.model.weights import full_weights, load_full_weights
    from mtp_megatron.runtime import mcore_compat
    from tests.reference import gpt_mtp as ref
    from tests.reference.harness import (
        before_optimizer_step,
        finish,
        global_batch,
        make_trainer,
        perturb,
        reference_config,
        tiny_config,
    )

    out = {}
    for name, values in CASES.items():
        cfg = tiny_config(1, output_dir, train_iters=1, clip_grad=0.0, **values)
        trainer = make_trainer(cfg)
        load_full_weights(trainer.model, perturb(full_weights(trainer.model), seed=3))
        gpt = trainer.model[0].module
        grads = {}
        before_optimizer_step(trainer, lambda _it: grads.update(  # noqa: B023
            mcore_compat.mtp_layer_state_keys(
                {n: p.main_grad.detach().clone() for n, p in gpt.named_parameters()})))  # noqa: B023
        weights = ref.leaf_weights(mcore_compat.mtp_layer_state_keys(gpt.state_dict()))
        step = trainer.train_step()
        finish(trainer)

        rcfg = reference_config(cfg)
        batch = global_batch(trainer, 1)
        outs = [ref.forward(weights, rcfg, mb["tokens"], mb["labels"], mb["loss_mask"])
                for mb in batch]
        depth = cfg.mtp.mtp_num_layers
        moe_layers = sum(cfg.model.moe_layers) + depth * cfg.model.moe_layers[-1]
        coeff = cfg.model.moe_aux_loss_coeff
        no_aux = ref.ReferenceConfig(**{**rcfg.__dict__, "moe": dataclasses.replace(
            rcfg.moe, aux_coeff=0.0)})
        no_bias = ref.ReferenceConfig(**{**rcfg.__dict__, "moe": dataclasses.replace(
            rcfg.moe, use_expert_bias=False)})
        unbiased = [ref.forward(weights, no_bias, mb["tokens"], mb["labels"], mb["loss_mask"])
                    for mb in batch]
        out[name] = dict(
            lm=(step.lm_loss, (sum(o["sums"][0] for o in outs)
                               / sum(o["counts"][0] for o in outs)).item()),
            mtp=(step.mtp_losses, [sum(o["mtp"][k] for o in outs).item() / len(outs)
                                   for k in range(depth)]),
            balancing=(step.moe["load balancing loss"],
                       sum(float(sum(o["aux"])) for o in outs) / len(outs) / coeff / moe_layers),
            aux_terms=len(outs[0]["aux"]), moe_layers=moe_layers,
            grad=_grad_error(grads, ref.gradients(weights, ref.step_objective(
                weights, rcfg, batch))),
            grad_without_aux=_grad_error(grads, ref.gradients(weights, ref.step_objective(
                weights, no_aux, batch))),
            lm_without_bias=(sum(o["sums"][0] for o in unbiased)
                             / sum(o["counts"][0] for o in unbiased)).item(),
            max_grad=max(g.abs().max().item() for g in grads.values()),
        )
        torch.distributed.barrier()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(1, _run_cases, str(tmp_path_factory.mktemp("reference_moe")))[0]


@pytest.mark.parametrize("name", list(CASES))
def test_losses_match_the_reference(results, name):
    r = results[name]
    assert r["lm"][0] == pytest.approx(r["lm"][1], abs=LOSS_TOL)
    assert r["mtp"][0] == pytest.approx(r["mtp"][1], abs=LOSS_TOL)
    assert r["aux_terms"] == r["moe_layers"]  # every MoE layer, MTP ones included
    assert r["balancing"][0] == pytest.approx(r["balancing"][1], rel=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_is_that_of_the_objective_with_the_balancing_loss(results, name):
    r = results[name]
    worst, where = r["grad"]
    assert worst <= 1.0, f"{where}: gradient differs from d(objective) by {worst:.2f} x tol"
    assert r["grad_without_aux"][0] > 10.0  # the balancing term is really in it
    assert r["max_grad"] > 1e-3


def test_the_expert_bias_changes_the_routing(results):
    """Without the (perturbed) expert bias the reference routes differently."""
    r = results["dsv3"]
    assert abs(r["lm_without_bias"] - r["lm"][1]) > 1e-3
