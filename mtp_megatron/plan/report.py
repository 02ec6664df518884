"""The plan as text: rank grid, parameters and memory per rank, FLOPs, throughput."""

from __future__ import annotations

from typing import List

from mtp_megatron.model.counting import layer_types, model_params
from mtp_megatron.plan.layout import coord_of, expert_coord_of, group_spans, span
from mtp_megatron.plan.memory import GIB, fused_attention
from mtp_megatron.plan.planner import Plan, StagePlan

FULL_TABLE_MAX_RANKS = 32


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _si(n: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} "


def _table(rows: List[List[str]], indent: str = "  ") -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in rows]


def _layers(stage: StagePlan) -> str:
    return ", ".join(span(start, end - 1) for start, end in stage.layout.layers)


def header(plan: Plan) -> List[str]:
    cfg = plan.cfg
    m, par, train = cfg.model, cfg.parallel, cfg.training
    tp, cp, dp = (par.tensor_model_parallel_size, par.context_parallel_size,
                  par.data_parallel_size)
    pp = par.pipeline_model_parallel_size
    mtp = f"MTP depth {cfg.mtp.mtp_num_layers}" if cfg.mtp.enabled else "no MTP"
    if cfg.mtp.enabled and cfg.mtp.mtp_use_repeated_layer:
        mtp += " (one repeated MTP layer)"
    if cfg.mtp.enabled and cfg.mtp.mtp_detach_heads:
        mtp += " (detached heads: MTP gradients stop at the MTP layers)"
    vpp = cfg.virtual_pipeline_size
    vpp = f", {vpp} virtual stages per rank" if vpp else ""
    groups = "" if m.multi_latent_attention else f" ({m.query_groups} query groups)"
    return [
        f"Plan for {plan.world_size} GPUs: TP {tp} x CP {cp} x DP {dp} x PP {pp}{vpp}",
        f"  model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads"
        f"{groups}, ffn {m.ffn_size}{' SwiGLU' if m.swiglu else ''}, "
        f"seq {m.seq_length}, vocab {plan.vocab_size} (padded), "
        f"{'untied' if m.untie_embeddings_and_output_weights else 'tied'} embeddings, {mtp}",
    ] + _mla_header(plan) + _moe_header(plan) + [
        f"  batch: micro {train.micro_batch_size}, global {train.global_batch_size} "
        f"= {cfg.num_microbatches} micro-batches per DP rank per step; "
        f"{'bf16' if train.bf16 else 'fp16' if train.fp16 else 'fp32'}, "
        f"{'distributed' if par.use_distributed_optimizer else 'replicated'} optimizer"
        f"{', sequence parallel' if par.sequence_parallel else ''}",
    ]


def _mla_header(plan: Plan) -> List[str]:
    m = plan.cfg.model
    if not m.multi_latent_attention:
        return []
    q = f"query latent {m.q_lora_rank}" if m.q_lora_rank else "no query latent"
    yarn = f", YaRN x{m.rotary_scaling_factor:g}" if m.mla_rope_type == "yarn" and \
        m.rotary_scaling_factor > 1 else f", {m.mla_rope_type}"
    return [f"  attention: multi-latent ({q}, key/value latent {m.kv_lora_rank}, per head "
            f"qk {m.qk_head_dim} + rope {m.qk_pos_emb_head_dim}, v {m.v_head_dim}"
            f"{', latent norms' if m.qk_layernorm else ''}{yarn})"]


def _moe_header(plan: Plan) -> List[str]:
    cfg = plan.cfg
    m, par = cfg.model, cfg.parallel
    if not m.moe:
        return []
    types = layer_types(cfg)
    mtp = ""
    if types["mtp"]:
        mtp = f"; MTP layers {'MoE' if types['mtp'][0] else 'dense'} (the last layer's type)"
    shared = f", shared experts {m.moe_shared_expert_intermediate_size}" \
        if m.moe_shared_expert_intermediate_size else ""
    bias = ", aux-loss-free expert bias" if m.moe_router_enable_expert_bias else ""
    return [
        f"  MoE: {m.num_experts} experts, top-{m.moe_router_topk} ({m.moe_router_score_function}"
        f"{bias}), expert ffn {m.moe_ffn_size}{shared}; {sum(types['decoder'])} of "
        f"{m.num_layers} layers MoE{mtp}",
        f"  experts: EP {par.expert_model_parallel_size} x ETP {par.expert_tensor_size} x "
        f"expert-DP {par.expert_data_parallel_size}, "
        f"{m.num_experts // par.expert_model_parallel_size} experts of each MoE layer per rank, "
        f"{par.moe_token_dispatcher_type} dispatcher",
    ]


def _expert_groups(plan: Plan) -> List[str]:
    cfg = plan.cfg
    par = cfg.parallel
    if not cfg.model.moe:
        return []
    etp, ep, edp = par.expert_tensor_size, par.expert_model_parallel_size, \
        par.expert_data_parallel_size
    per = cfg.model.num_experts // ep
    members = ", ".join(str(e * etp) for e in range(min(ep, 4))) + (", ..." if ep > 4 else "")
    return [
        f"  EP groups: {ep} ranks {etp} apart within a stage ({members}); EP rank e holds "
        f"experts {per}e to {per}e+{per - 1} of every MoE layer",
        f"  expert-DP groups: {edp} ranks {etp * ep} apart (experts' gradients reduced and, "
        "with --use-distributed-optimizer, their optimizer state sharded there)",
    ]


def rank_layout(plan: Plan) -> List[str]:
    par = plan.cfg.parallel
    tp, cp, dp = (par.tensor_model_parallel_size, par.context_parallel_size,
                  par.data_parallel_size)
    block = tp * cp * dp
    lines = ["", f"Rank layout (megatron-core order tp-cp-ep-dp-pp: rank = tp + {tp}*(cp + "
             f"{cp}*(dp + {dp}*pp)))"]
    rows = [["stage", "ranks", "decoder layers", "also holds"]]
    for stage in plan.stages:
        lay = stage.layout
        rows.append([str(lay.pp_rank), span(lay.first_rank, lay.last_rank), _layers(stage),
                     "; ".join(lay.holds) or "-"])
    lines += _table(rows)
    lines.append(f"  TP groups: {tp} consecutive ranks ({group_spans(0, tp, dp * cp, tp)})")
    dp_members = ", ".join(str(d * tp * cp) for d in range(min(dp, 4)))
    more = f", ..., {(dp - 1) * tp * cp}" if dp > 4 else ""
    lines.append(f"  DP groups: {dp} ranks {tp * cp} apart within a stage ({dp_members}{more})")
    if len(plan.stages) > 1:
        members = ", ".join(str(p * block) for p in range(min(len(plan.stages), 3)))
        more = f", ..., {block * (len(plan.stages) - 1)}" if len(plan.stages) > 3 else ""
        lines.append(f"  PP groups: {len(plan.stages)} ranks {block} apart ({members}{more})")
    if plan.cfg.mtp.enabled:
        last = plan.stages[-1].layout
        copy = f" + a synchronised copy on stage {last.pp_rank}" if last.pp_rank else ""
        lines.append(f"  MTP layers: stage {last.pp_rank}, ranks "
                     f"{span(last.first_rank, last.last_rank)}; shared embedding: stage 0{copy}")
    lines += _expert_groups(plan)
    if plan.world_size <= FULL_TABLE_MAX_RANKS:
        cells = [f"{r}:(dp{c.dp},pp{c.pp},tp{c.tp})"
                 for r, c in ((r, coord_of(plan.cfg, r)) for r in range(plan.world_size))]
        if plan.cfg.model.moe:
            cells = [cell[:-1] + ",ep{1})".format(*expert_coord_of(plan.cfg, r))
                     for r, cell in enumerate(cells)]
        what = "(DP, PP, TP, EP)" if plan.cfg.model.moe else "(DP, PP, TP)"
        lines.append(f"  rank -> {what}: " + " ".join(cells))
    return lines


def parameters(plan: Plan) -> List[str]:
    lines = ["", "Parameters per stage (all TP ranks together) and per rank (one TP shard)"]
    rows = [["stage", "decoder", "embedding", "output", "final norm", "MTP", "stage total",
             "per rank"]]
    for stage in plan.stages:
        sp = stage.stage_params
        rows.append([str(stage.layout.pp_rank)] + [f"{sp[k]:,}" for k in (
            "decoder", "embedding", "output", "final_norm", "mtp", "total")]
            + [f"{stage.rank_params['total']:,}"])
    lines += _table(rows)
    held = sum(s.stage_params["total"] for s in plan.stages)
    lines.append(f"  held over all stages: {held:,} ({_si(held)}); one model replica, "
                 "pipeline copies of shared weights included")
    if plan.cfg.model.moe:
        counts = model_params(plan.cfg, plan.vocab_size)
        experts = max(s.rank_params["experts"] for s in plan.stages)
        lines.append(f"  MoE: {_si(counts['total'])} parameters in total, "
                     f"{_si(counts['active'])} active per token "
                     f"({counts['active'] / counts['total']:.1%}; matmul weights and embedding, "
                     f"MTP included); routed experts' share of a rank: up to {experts:,}")
    return lines


def memory_table(plan: Plan) -> List[str]:
    cfg = plan.cfg
    attn = "fused attention (TE)" if fused_attention(cfg) else "unfused attention (s x s kept)"
    lines = ["", f"Memory per rank (one rank per stage; {attn}; "
             "excludes CUDA context, NCCL buffers, fragmentation)"]
    fit_col = f"fits {plan.gpu_memory_gb:g} GiB" if plan.gpu_memory_gb is not None else "fits"
    if plan.gpu_memory_assumed:
        fit_col += " (assumed)"
    rows = [["stage", "rank", "weights", "grads", "optimizer", "act/micro-batch", "in flight",
             "act peak", "total", fit_col]]
    for stage in plan.stages:
        fits = plan.fits(stage)
        rows.append([
            str(stage.layout.pp_rank), str(stage.layout.first_rank),
            _bytes(stage.state.weights), _bytes(stage.state.grads), _bytes(stage.state.optimizer),
            _bytes(stage.activation_per_microbatch), str(stage.in_flight),
            _bytes(stage.activation_peak), _bytes(stage.total_bytes),
            "-" if fits is None else ("yes" if fits else "NO"),
        ])
    lines += _table(rows)
    last = plan.stages[-1]
    parts = ", ".join(f"{name} {_bytes(v)}" for name, v in last.activations.items())
    lines.append(f"  last stage, one micro-batch: {parts}")
    train = plan.cfg.training
    if train.recompute_granularity:
        how = train.recompute_granularity
        if how == "full":
            how += f" ({train.recompute_method}, {train.recompute_num_layers} layers)"
        mtp = "MTP layers recomputed too" if plan.cfg.mtp.enabled and (
            how.startswith("selective") or train.recompute_method == "uniform") else (
            "MTP layers NOT recomputed (megatron-core: block)" if plan.cfg.mtp.enabled
            else "")
        lines.append(f"  activation recompute: {how}" + (f"; {mtp}" if mtp else ""))
    if plan.all_fit is False:
        worst = max(plan.stages, key=lambda s: s.total_bytes)
        lines.append(
            f"  DOES NOT FIT: stage {worst.layout.pp_rank} needs {_bytes(worst.total_bytes)} "
            f"per GPU > {_memory_source(plan)}. Try --use-distributed-optimizer, "
            "--sequence-parallel, a larger --tensor-model-parallel-size or "
            "--pipeline-model-parallel-size, or a smaller --micro-batch-size.")
    return lines


def _memory_source(plan: Plan) -> str:
    if plan.gpu_memory_assumed:
        return (f"{plan.gpu_memory_gb:g} GiB (assumed: set --gpu-memory-gb to your GPU's; "
                "given, a plan that does not fit exits 2)")
    return f"--gpu-memory-gb {plan.gpu_memory_gb:g}"


def flops(plan: Plan) -> List[str]:
    with_mtp, without = plan.flops, plan.flops_without_mtp
    lines = ["", "Training FLOPs per token (forward + backward = 3 x forward)"]
    rows = [["part", "with MTP", "without MTP"]]
    for name in ("decoder", "logits", "mtp_layers", "eh_proj", "mtp_logits", "total"):
        rows.append([name, f"{_si(with_mtp[name])}FLOP", f"{_si(without[name])}FLOP"])
    lines += _table(rows)
    extra = with_mtp["total"] / without["total"] - 1
    lines.append(f"  MTP adds {extra:.1%} FLOPs per token")
    if plan.cfg.model.moe:
        lines.append(f"  MoE layers count the router, the top-{plan.cfg.model.moe_router_topk} "
                     "routed experts and the shared experts a token passes (active, not total)")
    tps = plan.tokens_per_second
    lines += [
        "", f"Throughput at MFU {plan.mfu:.2f} of {plan.peak_tflops:g} TFLOP/s per GPU "
        "(H100 SXM dense bf16 peak; MTP FLOPs counted as model FLOPs)",
        f"  {tps:,.0f} tokens/s ({tps / plan.world_size:,.0f} per GPU); "
        f"{plan.seconds_per_iteration:.3g} s per iteration of "
        f"{plan.cfg.training.global_batch_size * plan.cfg.model.seq_length:,} tokens",
    ]
    return lines


def format_plan(plan: Plan) -> str:
    return "\n".join(header(plan) + rank_layout(plan) + parameters(plan) + memory_table(plan)
                     + flops(plan))
