"""Resuming with another layout or schedule is never silently different (issue 19 items
1, 2, 5 and 10), on the real Trainer in two spawned gloo ranks (one spawn for the module).

* item 1: a DP2 run resumed at TP2 equals the straight run. The byte-level vocabulary
  (258, padded to 384 at TP 1) used to grow to 512 rows at TP 2, the new rows fresh, and
  the loss jumped (0.38 nats in the issue); now the checkpoint's 384 rows are kept. With
  257 rows (``--make-vocab-size-divisible-by 1``), which TP 2 cannot split, the model has
  258 rows and the new one is masked: no probability mass, the same losses.
* item 2: a longer ``--train-iters`` (or another ``--lr``) on resume is refused naming
  ``--override-opt-param-scheduler`` and ``--use-checkpoint-opt-param-scheduler``; each
  flag does what it says (on megatron-core 0.19 ``--lr`` used to fail the optimizer load
  with a traceback, on 0.16 it silently had no effect); ``--no-load-optim`` continues the
  schedule (it used to restart the warmup).
* item 5: a resume into the same ``--output-dir`` leaves one row per iteration.
* item 10: ``Trainer.train()`` keeps no step history: at the last step of a 12-step run
  with ``--log-interval 4`` at most a window's StepMetrics are alive.
"""

from __future__ import annotations

import gc
import math
import os

import pytest

from tests.dist_utils import spawn
from tests.functional import resume_matrix as rm

pytestmark = [pytest.mark.multirank, pytest.mark.compat]  # the 0.16 and 0.19 schedule loads differ

TINY = dict(rm.TINY, mtp_num_layers=1, train_iters=4)
TP2 = dict(tensor_model_parallel_size=2)
TOL = 1e-6  # TP1 -> TP2 reorders a few reductions (measured: 0 and 4.8e-7); a fresh row 3.8e-3


class Runs:
    """Trainers in this rank, any layout: model-parallel groups rebuilt per config."""

    def __init__(self):
        from mtp_megatron.runtime import distributed
        from tests.reference import harness

        distributed.initialize = harness._initialize_in_place

    def trainer(self, root, name, **cli):
        import torch.distributed as dist

        from mtp_megatron.config import build_config
        from mtp_megatron.runtime.launch_env import read_launch_env
        from mtp_megatron.training.trainer import Trainer

        values = dict(TINY, output_dir=os.path.join(root, name))
        values.update(cli)
        cfg = build_config(None, values, dist.get_world_size() if dist.is_initialized() else 2)
        return Trainer(cfg, read_launch_env(os.environ), "local")

    def run(self, root, name, **cli):
        """(losses, lrs) by iteration, and the trainer's vocabulary rows."""
        t = self.trainer(root, name, **cli)
        steps = []
        t.train(on_step=steps.append)
        rows = (t.vocab_size, t.state.live_rows)
        t.metrics.close()
        if t.save_lock is not None:
            t.save_lock.release()
        return ({s.iteration: s.lm_loss for s in steps}, {s.iteration: s.lr for s in steps},
                rows)


def _error(runs, root, name, **cli):
    from mtp_megatron.checkpoint import CheckpointError

    try:
        runs.run(root, name, **cli)
    except CheckpointError as exc:
        return str(exc)
    return None


def _vocab_cases(runs, root):
    out = {}
    for case, vocab in (("kept", dict(vocab_size=258)),
                        ("masked", dict(vocab_size=257, make_vocab_size_divisible_by=1))):
        ck = os.path.join(root, case, "ck")
        out[case] = {
            "straight": runs.run(root, f"{case}/a", save=ck, save_interval=2, **vocab),
            "resumed": runs.run(root, f"{case}/b", load=os.path.join(ck, "iter_0000002"),
                                save=os.path.join(root, case, "ck_tp2"), **vocab, **TP2),
        }
        from mtp_megatron.checkpoint.vocab import saved_vocab

        out[case]["saved_by_tp2"] = saved_vocab(os.path.join(root, case, "ck_tp2",
                                                             "iter_0000004"))
    return out


def _schedule_cases(runs, root):
    ck = os.path.join(root, "lr", "ck")
    half = os.path.join(ck, "iter_0000002")
    out = {"straight": runs.run(root, "lr/a", save=ck, save_interval=2)}
    out["longer_refused"] = _error(runs, root, "lr/b", load=half, train_iters=8)
    out["lr_refused"] = _error(runs, root, "lr/c", load=half, lr=0.01)
    out["override"] = runs.run(root, "lr/d", load=half, train_iters=8,
                               override_opt_param_scheduler=True)
    out["fresh_8"] = runs.run(root, "lr/e", train_iters=8)  # the schedule override follows
    out["keep"] = runs.run(root, "lr/f", load=half, train_iters=8,
                           use_checkpoint_opt_param_scheduler=True)
    out["lr_override"] = runs.run(root, "lr/g", load=half, lr=0.01,
                                  override_opt_param_scheduler=True)
    out["no_load_optim"] = runs.run(root, "lr/h", load=half, no_load_optim=True)
    return out


def _metrics_and_history(runs, root):
    from mtp_megatron.training.metrics import StepMetrics
    from mtp_megatron.training.writers import read_rows

    out_dir = os.path.join(root, "m", "out")
    ck = os.path.join(root, "m", "ck")
    cli = dict(output_dir=out_dir, save=ck, save_interval=2)
    runs.run(root, "m", **cli)  # 4 iterations, rows 1-4
    # a crash after iteration 4 whose last checkpoint is 2: resume from it, same directory
    runs.run(root, "m", load=os.path.join(ck, "iter_0000002"),
             **dict(cli, save=os.path.join(root, "m", "ck2")))
    rows = [r["iteration"] for r in read_rows(os.path.join(out_dir, "metrics.jsonl"))]

    alive = []
    t = runs.trainer(root, "hist", train_iters=12, log_interval=4)
    record = t.metrics.record

    def counting(step):
        record(step)
        if step.iteration == 12:
            gc.collect()
            alive.append(sum(isinstance(o, StepMetrics) for o in gc.get_objects()))

    t.metrics.record = counting
    last = t.train()
    t.metrics.close()
    return {"rows": rows, "alive_at_12": alive, "last": last.iteration}


def _body(rank, world_size, root):
    import torch

    torch.set_num_threads(1)
    runs = Runs()
    return {"vocab": _vocab_cases(runs, root), "schedule": _schedule_cases(runs, root),
            "metrics": _metrics_and_history(runs, root)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    per_rank = spawn(2, _body, str(tmp_path_factory.mktemp("resume_changes")))
    return per_rank[-1]  # the last rank logs the losses


def _close(a, b):
    return a is not None and b is not None and abs(a - b) <= TOL


def test_tp_change_keeps_the_checkpoints_padded_vocabulary(results):
    case = results["vocab"]["kept"]
    straight, _, rows_a = case["straight"]
    resumed, _, rows_b = case["resumed"]
    assert rows_a == (384, 384) and rows_b == (384, 384)  # a fresh TP 2 run would have 512
    assert sorted(resumed) == [3, 4]
    for it in (3, 4):
        assert _close(straight[it], resumed[it]), (it, straight[it], resumed[it])
    assert case["saved_by_tp2"]["padded_vocab_size"] == 384


def test_rows_tp_cannot_split_are_added_masked(results):
    case = results["vocab"]["masked"]
    straight, _, rows_a = case["straight"]
    resumed, _, rows_b = case["resumed"]
    assert rows_a == (257, 257) and rows_b == (258, 257)
    for it in (3, 4):
        assert _close(straight[it], resumed[it]), (it, straight[it], resumed[it])
    # the TP 2 run's checkpoint remembers where the live rows end
    assert case["saved_by_tp2"]["padded_vocab_size"] == 258
    assert case["saved_by_tp2"]["live_rows"] == 257


def test_a_changed_schedule_is_refused_naming_both_flags(results):
    for key, flag in (("longer_refused", "--lr-decay-iters (default: --train-iters) 4 -> 8"),
                      ("lr_refused", "--lr 0.003 -> 0.01")):
        msg = results["schedule"][key]
        assert msg is not None, key
        assert flag in msg and "--override-opt-param-scheduler" in msg, msg
        assert "--use-checkpoint-opt-param-scheduler" in msg


def test_override_continues_with_this_runs_schedule(results):
    s = results["schedule"]
    _, lrs, _ = s["override"]
    _, fresh, _ = s["fresh_8"]
    assert sorted(lrs) == list(range(3, 9))
    for it in range(3, 9):  # the schedule of an 8-iteration run, from step 3 on
        assert lrs[it] == fresh[it], (it, lrs[it], fresh[it])
    assert lrs[4] > rm.TINY.get("min_lr", 2e-4)  # not the old schedule's end


def test_use_checkpoint_keeps_the_checkpoints_schedule(results):
    s = results["schedule"]
    _, straight, _ = s["straight"]
    losses, lrs, _ = s["keep"]
    assert lrs[3] == straight[3] and lrs[4] == straight[4]
    assert all(math.isclose(lrs[it], 2e-4) for it in range(4, 9))  # --min-lr past its end
    assert sorted(losses) == list(range(3, 9))


def test_lr_override_takes_effect(results):
    s = results["schedule"]
    _, straight, _ = s["straight"]
    _, lrs, _ = s["lr_override"]
    assert lrs[3] > 2 * straight[3], (lrs[3], straight[3])


def test_no_load_optim_continues_the_schedule(results):
    s = results["schedule"]
    _, straight, _ = s["straight"]
    _, lrs, _ = s["no_load_optim"]
    assert lrs[3] == straight[3] and lrs[4] == straight[4]  # not the warmup again


def test_a_resume_into_the_same_output_dir_leaves_one_row_per_iteration(results):
    assert results["metrics"]["rows"] == [1, 2, 3, 4]


def test_train_keeps_no_step_history(results):
    m = results["metrics"]
    assert m["last"] == 12
    assert m["alive_at_12"] and m["alive_at_12"][0] <= 4 + 1, m["alive_at_12"]
