"""Every megatron-core workaround, re-proven on the installed release.

``mcore_compat.WORKAROUNDS`` says which release line still needs each one. Here each
scenario runs *without* its workaround (``mcore_compat.needs`` patched to False for it,
inside the spawned ranks) and the failure must appear exactly where the table says
"needed" (on 0.19.2 in ``make test``, on 0.16.1 in ``make test-compat``): a table that
keeps a workaround a release no longer needs, or drops one it still needs, fails here.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from tests.dist_utils import spawn

pytestmark = [pytest.mark.multirank, pytest.mark.compat]

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
            micro_batch_size=2, global_batch_size=4, lr=3e-3, lr_warmup_iters=0,
            mock_data=True, eval_iters=0, log_interval=1, mtp_num_layers=2, train_iters=2)


@contextlib.contextmanager
def _without(name):
    """``mcore_compat.needs(name)`` is False inside the block (this process only)."""
    from mtp_megatron.runtime import mcore_compat

    real = mcore_compat.needs
    mcore_compat.needs = lambda workaround: False if workaround == name else real(workaround)
    try:
        yield
    finally:
        mcore_compat.needs = real


def _distopt_state(trainer):
    from mtp_megatron.checkpoint.distopt_ranges import distributed_optimizers

    names = {p: n for chunk in trainer.model for n, p in chunk.named_parameters()}
    out = {}
    for sub in distributed_optimizers(trainer.optimizer):
        for gbuf in sub.gbuf_ranges:
            for buckets in gbuf.values():
                for bucket in buckets:
                    for param in bucket["param_map"]:
                        tensors = sub._get_main_param_and_optimizer_states(param)
                        out[names[param]] = {k: v.detach().clone() for k, v in tensors.items()
                                             if k != "step"}
    return out


def _one_rank(rank, world_size, root):
    """Scenarios that need one rank; returns {workaround: failure observed without it}."""
    import torch

    from mtp_megatron.checkpoint import dist_ckpt
    from mtp_megatron.runtime import mcore_compat
    from tests.functional.resume_matrix import Session

    session = Session(world_size)
    seen = {"line": mcore_compat.line()}

    # distopt_bucket_padding: overlapped small buckets put padding between buckets; save
    # and load without re-laying the world tensors, then compare every state element.
    cli = dict(TINY, use_distributed_optimizer=True, overlap_grad_reduce=True,
               ddp_bucket_size=3000)
    ck = os.path.join(root, "padding")
    with _without("distopt_bucket_padding"):
        saved, _ = session.run(None, dict(cli, save=ck, save_interval=2,
                                          output_dir=os.path.join(root, "a")))
        before = _distopt_state(saved)
        loaded = session.trainer(None, dict(cli, load=ck, output_dir=os.path.join(root, "b")))
        after = _distopt_state(loaded)
    seen["distopt_bucket_padding"] = any(
        not v.equal(after[n][k]) for n, states in before.items() for k, v in states.items())
    del saved, loaded

    # torch_adam_step: a fresh distributed optimizer over torch's Adam asked for its
    # sharded state to load into, and then loaded, without our step handling.
    ck = os.path.join(root, "adam")
    trained, _ = session.run(None, dict(TINY, use_distributed_optimizer=True, save=ck,
                                        save_interval=2, output_dir=os.path.join(root, "c")))
    del trained
    fresh = session.trainer(None, dict(TINY, use_distributed_optimizer=True,
                                       output_dir=os.path.join(root, "d")))
    failed = False
    with _without("torch_adam_step"):
        try:
            dist_ckpt.load_checkpoint(fresh.state, ck, checkpoint=fresh.cfg.checkpoint)
            inner = [sub.optimizer for sub in
                     getattr(fresh.optimizer, "chained_optimizers", [fresh.optimizer])]
            steps = [st["step"] for opt in inner for st in opt.state.values() if "step" in st]
            failed = len({id(s) for s in steps}) < len(steps)  # one tensor shared by all
        except (AssertionError, KeyError):
            failed = True
    seen["torch_adam_step"] = failed and not dist_ckpt.HAVE_APEX_OR_TE

    # float16_module: bf16 chunks not wrapped: do all parameters end up in bf16?
    with _without("float16_module"):
        bf16 = session.trainer(None, dict(TINY, bf16=True, output_dir=os.path.join(root, "e")))
        dtypes = {p.dtype for chunk in bf16.model for p in chunk.parameters()}
    seen["float16_module"] = dtypes != {torch.bfloat16}
    return seen


def _two_ranks(rank, world_size, root):
    """PP2 scenarios: the MTP stage's unused output weight, and VPP's batched p2p."""
    import torch

    from mtp_megatron.config import build_config
    from mtp_megatron.runtime import mcore_compat
    from tests.reference.harness import finish, make_trainer

    seen = {"line": mcore_compat.line()}

    # unused_mtp_output_weight: the last stage (MTP, tied embeddings, not the first) keeps
    # an output weight; after a step it has received no gradient at all.
    cfg = build_config({}, dict(TINY, pipeline_model_parallel_size=2,
                                output_dir=os.path.join(root, "pp2")), world_size)
    with _without("unused_mtp_output_weight"):
        trainer = make_trainer(cfg)
        trainer.train_step()
    if rank == 1:
        gpt = trainer.model[0]
        while hasattr(gpt, "module"):
            gpt = gpt.module
        weight = gpt.output_layer.weight
        grad = None if weight is None else getattr(weight, "main_grad", weight.grad)
        seen["unused_mtp_output_weight"] = weight is not None and (
            grad is None or not bool(grad.abs().sum() > 0))
    finish(trainer)

    # vpp_unbatched_p2p: PP2 x VPP2, 4 microbatches; batched p2p vs separate sends.
    vpp = dict(TINY, pipeline_model_parallel_size=2, num_layers=4,
               num_layers_per_virtual_pipeline_stage=1, micro_batch_size=1,
               global_batch_size=4, train_iters=3)
    losses = {}
    for name, ctx in (("separate", contextlib.nullcontext()),
                      ("batched", _without("vpp_unbatched_p2p"))):
        with ctx:
            cfg = build_config({}, dict(vpp, output_dir=os.path.join(root, name)), world_size)
            trainer = make_trainer(cfg)
            assert trainer.tconfig.batch_p2p_comm == (name == "batched")
            history = [trainer.train_step() for _ in range(3)]
        losses[name] = [(s.lm_loss, s.mtp_losses) for s in history]
        finish(trainer)
        torch.distributed.barrier()
    if rank == 1:
        seen["vpp_unbatched_p2p"] = losses["separate"] != losses["batched"]
    return seen


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    one = spawn(1, _one_rank, str(tmp_path_factory.mktemp("one")))[0]
    two = spawn(2, _two_ranks, str(tmp_path_factory.mktemp("two")))[1]  # the last stage
    assert one["line"] == two["line"]
    return dict(one, **two)


@pytest.mark.parametrize("name", ["distopt_bucket_padding", "torch_adam_step",
                                  "float16_module", "unused_mtp_output_weight",
                                  "vpp_unbatched_p2p"])
def test_the_workaround_table_matches_what_this_release_does(observed, name):
    from mtp_megatron.runtime import mcore_compat

    needed = mcore_compat.WORKAROUNDS[name][observed["line"]]
    assert observed[name] == needed, (
        f"megatron-core {observed['line']}: without the {name} workaround the failure "
        f"{'did not appear' if needed else 'appeared'}; fix mcore_compat.WORKAROUNDS")


def test_every_workaround_is_tested_here():
    from mtp_megatron.runtime import mcore_compat

    tested = {"distopt_bucket_padding", "torch_adam_step", "float16_module",
              "unused_mtp_output_weight", "vpp_unbatched_p2p"}
    assert set(mcore_compat.WORKAROUNDS) == tested
