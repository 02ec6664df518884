"""The save directory's rules in pure Python: commit, recovery, retention, lock, exit codes."""

import errno
import json
import logging
import os
import re
import socket

import pytest

from mtp_megatron.checkpoint import commit, layout, lock
from mtp_megatron.checkpoint.layout import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _checkpoint(root, iteration, payload="old", complete=True, suffix=""):
    path = layout.iteration_dir(str(root), iteration) + suffix
    os.makedirs(path)
    open(os.path.join(path, "payload"), "w").write(payload)
    if complete:
        open(os.path.join(path, layout.COMPLETE_MARKER), "w").write("{}")
    return path


def _payload(path):
    return open(os.path.join(path, "payload")).read()


def test_recommit_replaces_the_old_copy_only_once_the_new_one_is_in_place(tmp_path):
    old = _checkpoint(tmp_path, 10)
    layout.write_tracker(str(tmp_path), 10)
    _checkpoint(tmp_path, 10, payload="new", suffix=layout.PARTIAL_SUFFIX)
    final = commit.commit_partial(str(tmp_path), 10, {"run_config.yaml": "a: 1\n"})
    assert final == old and _payload(final) == "new"
    assert sorted(os.listdir(tmp_path)) == ["iter_0000010", "latest_checkpointed_iteration.txt"]
    assert open(os.path.join(final, "run_config.yaml")).read() == "a: 1\n"


def test_kill_between_renames_keeps_the_good_copy_loadable(tmp_path, monkeypatch):
    """The old code deleted iter_N first: a kill here left a shard-less iter_N."""
    _checkpoint(tmp_path, 10)
    layout.write_tracker(str(tmp_path), 10)
    _checkpoint(tmp_path, 10, payload="new", suffix=layout.PARTIAL_SUFFIX)
    real_replace, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # the process dies between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(commit.os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        commit.commit_partial(str(tmp_path), 10, {})
    monkeypatch.undo()
    assert not os.path.exists(layout.iteration_dir(str(tmp_path), 10))
    directory, iteration = layout.resolve_load_dir(str(tmp_path))
    assert iteration == 10 and directory.endswith(".replaced") and _payload(directory) == "old"
    actions = layout.restore_replaced(str(tmp_path))
    assert actions == [f"restored {layout.iteration_dir(str(tmp_path), 10)} from {directory}"]
    assert _payload(layout.resolve_load_dir(str(tmp_path))[0]) == "old"


def test_restore_replaced_drops_the_old_copy_when_the_new_one_is_complete(tmp_path):
    _checkpoint(tmp_path, 4, payload="new")
    _checkpoint(tmp_path, 4, suffix=layout.REPLACED_SUFFIX)
    _checkpoint(tmp_path, 6, payload="half", complete=False)  # new copy incomplete
    _checkpoint(tmp_path, 6, suffix=layout.REPLACED_SUFFIX)
    layout.restore_replaced(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000006"]
    assert _payload(str(tmp_path / "iter_0000004")) == "new"
    assert _payload(str(tmp_path / "iter_0000006")) == "old"


def test_retention_keeps_the_newest_and_the_tracked_one(tmp_path):
    for it in (1, 2, 3, 4, 5):
        _checkpoint(tmp_path, it)
    _checkpoint(tmp_path, 6, suffix=layout.PARTIAL_SUFFIX)
    layout.write_tracker(str(tmp_path), 3)  # e.g. a --finetune run re-saved iteration 3
    victims = layout.retention_victims(str(tmp_path), 2)
    assert [os.path.basename(v) for v in victims] == ["iter_0000001", "iter_0000002"]
    layout.write_tracker(str(tmp_path), 5)
    assert commit.remove_old(str(tmp_path), 1) == [
        layout.iteration_dir(str(tmp_path), it) for it in (1, 2, 3, 4)]
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000005", "iter_0000006.partial", "latest_checkpointed_iteration.txt"]
    assert commit.remove_old(str(tmp_path), None) == []


def test_describe_names_the_cause():
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ck/iter_0000002.partial/x")
    assert commit.describe(err) == ("[Errno 28] No space left on device: "
                                    "'/ck/iter_0000002.partial/x'")
    from torch.distributed.checkpoint.api import CheckpointException

    wrapped = CheckpointException("write", {1: (RuntimeError(
        "Worker failure: [Errno 27] File too large"), [])})
    assert commit.describe(wrapped) == "rank 1: [Errno 27] File too large"


# --- the lock -------------------------------------------------------------------------

def _write_lock(root, **owner):
    info = dict(lock.owner_info(), **owner)
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, lock.LOCK_NAME), "w").write(json.dumps(info))
    return info


def _dead_pid():
    """A pid no process can have (above the kernel's pid_max), without starting one."""
    with open("/proc/sys/kernel/pid_max") as fh:
        return int(fh.read()) + 1


def test_lock_refuses_a_second_writer_and_is_released(tmp_path):
    held = lock.SaveLock.acquire(str(tmp_path))
    written = json.load(open(tmp_path / lock.LOCK_NAME))
    assert written["pid"] == os.getpid() and written["host"] == socket.gethostname()
    with pytest.raises(CheckpointError) as err:
        lock.SaveLock.acquire(str(tmp_path))
    message = str(err.value)
    assert f"--save {tmp_path} is in use by another run" in message
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    held.release()
    held.release()  # idempotent
    assert not (tmp_path / lock.LOCK_NAME).exists()
    lock.SaveLock.acquire(str(tmp_path)).release()


@pytest.mark.parametrize("case", ["dead_pid", "reused_pid", "requeued_slurm_job"])
def test_stale_lock_is_taken_over_with_a_warning(case, tmp_path, caplog, monkeypatch):
    if case == "dead_pid":
        _write_lock(tmp_path, pid=_dead_pid())
    elif case == "reused_pid":
        _write_lock(tmp_path, pid=os.getppid(), pid_start="1")
    else:
        monkeypatch.setenv("SLURM_JOB_ID", "777")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        _write_lock(tmp_path, host="node-a", slurm_job_id="777", slurm_restart_count="0")
    with caplog.at_level(logging.WARNING, logger="mtp_megatron"):
        held = lock.SaveLock.acquire(str(tmp_path))
    assert "taking over the lock of a run that ended" in caplog.text
    assert json.load(open(tmp_path / lock.LOCK_NAME))["pid"] == os.getpid()
    held.release()


@pytest.mark.parametrize("case", ["live_pid", "other_host"])
def test_lock_that_may_be_live_is_refused_with_how_to_remove_it(case, tmp_path):
    if case == "live_pid":  # alive, same start time, though not holding flock
        _write_lock(tmp_path, pid=os.getppid(), pid_start=lock._start_time(os.getppid()))
    else:
        _write_lock(tmp_path, host="node-b", pid=123)
    with pytest.raises(CheckpointError) as err:
        lock.SaveLock.acquire(str(tmp_path))
    assert f"delete {tmp_path / lock.LOCK_NAME} and restart" in str(err.value)
    assert (tmp_path / lock.LOCK_NAME).exists()


# --- flags and exit codes -----------------------------------------------------------------

def test_ckpt_keep_last_is_validated():
    from mtp_megatron.config import ConfigError
    from mtp_megatron.config.checkpoint import CheckpointConfig

    assert CheckpointConfig(save="x", ckpt_keep_last=2).ckpt_keep_last == 2
    with pytest.raises(ConfigError, match="--ckpt-keep-last"):
        CheckpointConfig(save="x", ckpt_keep_last=0)
    with pytest.raises(ConfigError, match="only together with --save"):
        CheckpointConfig(ckpt_keep_last=3)


def test_exit_codes_are_distinct_and_documented():
    from mtp_megatron.cli import exit_code
    from mtp_megatron.config import ConfigError
    from mtp_megatron.exit_codes import ExitCode
    from mtp_megatron.training.faults import NonFiniteStepError

    codes = [exit_code(ConfigError("--x", 1, "y")), exit_code(CheckpointError("c")),
             exit_code(NonFiniteStepError(3)), exit_code(RuntimeError("?"))]
    assert codes == [2, 3, 4, 1]
    assert len({c.value for c in ExitCode}) == len(ExitCode)
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in ExitCode:
        assert re.search(rf"^\| {code.value} \|", section, re.M), code
