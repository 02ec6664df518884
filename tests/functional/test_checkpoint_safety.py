"""A save can never destroy the last good checkpoint, nor leave a process behind.

* ``test_save_failures_on_two_ranks``: disk full (RLIMIT_FSIZE: writes fail with EFBIG,
  as they would with ENOSPC) and injected ENOSPC in each phase, on 2 spawned ranks: one
  CheckpointError naming the path and the cause on every rank, the previous checkpoint
  intact, no ``.partial`` left; then re-saving a committed iteration and retention.
* ``test_one_writer_per_save_dir_and_no_orphans``: a second run on the same --save is
  refused (exit 3) naming the owner; kill -9 mid-save leaves no process of the run alive;
  the next run takes the stale lock over; a finished run restarted does not re-save.
* ``test_disk_full_under_torchrun``: the ranks print the same one-line error (torchrun
  may stop the slower rank before it prints).
"""

import os
import resource
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.dist_utils import spawn
from tests.functional.launcher import LAUNCHER, ROOT, TINY, launch

pytestmark = pytest.mark.functional

ARGS = TINY + ["--mock-data", "--lr-warmup-iters", "2"]
FSIZE_LIMIT = 32 * 1024  # above the 4 KiB probe and common.pt, below every shard file
# a shorter --train-iters than the run that saved (its LR schedule is kept)
KEEP_SCHEDULE = "--use-checkpoint-opt-param-scheduler"


def _state(save_dir, keep_last=None):
    import torch

    from mtp_megatron.checkpoint import TrainState
    from mtp_megatron.config import build_config
    from mtp_megatron.model.builder import build_model, transformer_config, vocab_size_for
    from mtp_megatron.training.optim import build_optimizer, build_scheduler
    from tests.dist_utils import init_ranks

    cli = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
           "micro_batch_size": 2, "global_batch_size": 8, "save": save_dir,
           "tensor_model_parallel_size": 2,  # both ranks write shards (DP replicas do not)
           "ckpt_keep_last": keep_last}
    cfg = build_config(None, cli, 2)
    init_ranks(cfg)
    model = build_model(cfg, transformer_config(cfg, on_cpu=True), "local",
                        vocab_size_for(cfg, 512), torch.device("cpu"))
    optimizer = build_optimizer(model, training=cfg.training, parallel=cfg.parallel)
    scheduler = build_scheduler(optimizer, training=cfg.training)
    return TrainState(model, optimizer, scheduler, cfg)


def _try_save(state, save_dir):
    from mtp_megatron.checkpoint import CheckpointError, save_checkpoint

    try:
        save_checkpoint(state, save_dir)
        return None
    except CheckpointError as exc:
        return str(exc)


def _save_failures_body(rank, world_size, save_dir):
    import dataclasses

    import torch

    from mtp_megatron.checkpoint.commit import INJECT_ENV

    state = _state(save_dir)
    out = {}
    state.iteration = 1
    out["first"] = _try_save(state, save_dir)
    state.iteration = 2
    for case, limited_rank in (("full_rank1", 1), ("full_both", None)):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limited_rank in (None, rank):
            resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, hard))
        out[case] = _try_save(state, save_dir)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    for phase in ("prepare", "commit"):
        os.environ[INJECT_ENV] = f"{phase}:0:2"
        out[phase] = _try_save(state, save_dir)
        del os.environ[INJECT_ENV]
    torch.distributed.barrier()  # rank 0 removes the partial after the others raised
    out["listing"] = sorted(os.listdir(save_dir))
    torch.distributed.barrier()  # every rank has looked before rank 0 saves again
    state.iteration = 1  # re-save a committed iteration: replaced, never lost
    out["resave"] = _try_save(state, save_dir)
    out["listing_resave"] = sorted(os.listdir(save_dir))
    torch.distributed.barrier()  # every rank has looked before rank 0 starts iter 3
    state.cfg = dataclasses.replace(state.cfg, checkpoint=dataclasses.replace(
        state.cfg.checkpoint, ckpt_keep_last=2))
    for it in (3, 4, 5):
        state.iteration = it
        out[f"keep{it}"] = _try_save(state, save_dir)
    out["listing_keep"] = sorted(os.listdir(save_dir))
    return out


def test_save_failures_on_two_ranks(tmp_path):
    save_dir = str(tmp_path / "ck")
    ranks = spawn(2, _save_failures_body, save_dir)
    target = os.path.join(save_dir, "iter_0000002")
    for rank, out in enumerate(ranks):
        assert out["first"] is None, out["first"]
        # which write fails first varies: EFBIG, or torch.save's "unexpected pos" after a
        # short write; every failing rank is named, with its cause
        nospace = "rank 0: [Errno 28] No space left on device"
        for case, causes in (("full_rank1", [f"{target}: rank 1: "]),
                             ("full_both", [f"{target}: rank 0: ", "; rank 1: "]),
                             ("prepare", [f"{target}: {nospace}: '<MTP_MEGATRON"]),
                             ("commit", [f"{target}: {nospace}: '<MTP_MEGATRON"])):
            message = out[case]
            assert message and message.startswith(f"cannot save checkpoint {target}: "), \
                (rank, case, message)
            assert all(cause in message for cause in causes), (rank, case, message)
            if case.startswith("full"):
                assert "File too large" in message or "unexpected pos" in message, message
            assert f"previous checkpoint {save_dir}/iter_0000001 is intact" in message
        for case in ("full_rank1", "full_both", "prepare", "commit"):
            assert out[case] == ranks[0][case]  # the same words on every rank
        assert "rank 0" not in out["full_rank1"]
        assert out["listing"] == ["iter_0000001", "latest_checkpointed_iteration.txt"]
        assert out["resave"] is None and out["listing_resave"] == out["listing"]
        assert out["keep3"] is None and out["keep5"] is None
    assert ranks[0]["listing_keep"] == ["iter_0000004", "iter_0000005",
                                        "latest_checkpointed_iteration.txt"]


def _run_processes(marker):
    """Live processes (not zombies) whose environment carries ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if marker.encode() in fh.read():
                    with open(f"/proc/{pid}/cmdline", "rb") as fh2:
                        found.append((int(pid), fh2.read().replace(b"\0", b" ").decode()))
        except (OSError, IndexError):
            continue
    return found


def _tracker(ck):
    return int(open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read())


def test_one_writer_per_save_dir_and_no_orphans(tmp_path):
    ck = str(tmp_path / "ck")
    marker = f"MTP_TEST_RUN={uuid.uuid4().hex}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               MTP_TEST_RUN=marker.split("=")[1])
    owner = subprocess.Popen(
        [sys.executable, LAUNCHER] + ARGS + ["--train-iters", "500", "--save", ck,
                                             "--save-interval", "2", "--output-dir",
                                             str(tmp_path / "a")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in owner.stdout:
            if "saved checkpoint" in line:
                break
        second = launch(ARGS + ["--train-iters", "4", "--save", ck],
                        output_dir=str(tmp_path / "b"), torchrun=False)
        assert second.returncode == 3, second
        assert f"--save {ck} is in use by another run (pid {owner.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr and second.metrics() == []
        assert owner.poll() is None  # the owner goes on
        # kill -9 while a later save is in progress (its writer processes are alive)
        deadline, killed = time.time() + 120, None
        while time.time() < deadline and killed is None:
            partials = [d for d in os.listdir(ck)
                        if d.endswith(".partial") and d != "iter_0000002.partial"]
            if partials:
                owner.send_signal(signal.SIGKILL)
                killed = partials[0]
            time.sleep(0.002)
        assert killed, "never saw a save in progress"
    finally:
        owner.kill()
        owner.wait(timeout=60)
    survivors = _run_processes(marker)
    for _ in range(50):
        if not survivors:
            break
        time.sleep(0.1)
        survivors = _run_processes(marker)
    assert survivors == [], survivors  # old code: a multiprocessing Manager (spawn) child
    latest = _tracker(ck)
    # the next run takes the dead owner's lock over; ends at a committed iteration
    resumed = launch(ARGS + ["--train-iters", str(latest + 2), "--save", ck,
                             "--save-interval", "1", "--ckpt-keep-last", "1", KEEP_SCHEDULE],
                     output_dir=str(tmp_path / "c"), torchrun=False, env={"MTP_TEST_RUN": "x"})
    assert resumed.returncode == 0, resumed
    assert f"taking over the lock of a run that ended without releasing it (pid {owner.pid}" \
        in resumed.stdout
    assert sorted(d for d in os.listdir(ck) if d.startswith("iter_") and "." not in d) == [
        f"iter_{latest + 2:07d}"]
    # a finished run restarted: loads, trains nothing and must not re-save (or delete) it
    final = os.path.join(ck, f"iter_{latest + 2:07d}")
    inode = os.stat(final).st_ino
    again = launch(ARGS + ["--train-iters", str(latest + 2), "--save", ck, KEEP_SCHEDULE],
                   output_dir=str(tmp_path / "d"), torchrun=False)
    assert again.returncode == 0, again
    assert "saved checkpoint" not in again.stdout and "taking over" not in again.stdout
    assert os.stat(final).st_ino == inode and _tracker(ck) == latest + 2
    assert not os.path.exists(os.path.join(ck, ".save.lock"))  # released at exit


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (FSIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_disk_full_under_torchrun(tmp_path):
    ck = str(tmp_path / "ck")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", LAUNCHER] + ARGS + ["--train-iters", "3", "--save", ck, "--save-interval", "2",
                                    "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"),
                          preexec_fn=_limit_file_size)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    # every rank prints the agreed error, then exits 3; torchrun stops the others at the
    # first exit, so a slower rank may be killed before its print: one or two lines,
    # always the same words (the first rank to exit has printed)
    assert 1 <= len(errors) <= 2, proc.stderr[-3000:]
    assert len(set(errors)) == 1, errors
    assert errors[0].startswith(f"error: cannot save checkpoint {ck}/iter_0000002: ")
    assert "[Errno 27] File too large" in errors[0] and "no earlier checkpoint" in errors[0]
    assert "Connection closed by peer" not in proc.stderr + proc.stdout
    assert "mtp_megatron/checkpoint" not in proc.stderr  # no traceback through our code
    assert sorted(os.listdir(ck)) == []  # the partial removed, the lock released
