"""Reading rank and rendezvous from torchrun's or SLURM's variables (pure Python)."""

import pytest

from mtp_megatron.config import ConfigError
from mtp_megatron.runtime.launch_env import expand_hostlist, read_launch_env

SLURM = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
         "SLURM_JOB_NODELIST": "gpu[007-010]", "SLURM_JOB_ID": "123456"}


def test_slurm_variables_give_rank_world_and_first_host():
    launch = read_launch_env(SLURM)
    assert (launch.rank, launch.local_rank, launch.world_size) == (3, 1, 8)
    assert launch.master_addr == "gpu007"
    assert launch.master_port == 20000 + 123456 % 20000 == 23456
    assert launch.launcher == "slurm"


def test_slurm_master_port_and_addr_from_env_win():
    launch = read_launch_env(dict(SLURM, MASTER_PORT="31000", MASTER_ADDR="head"))
    assert (launch.master_addr, launch.master_port) == ("head", 31000)


def test_torchrun_variables_win_over_slurm():
    env = dict(SLURM, RANK="5", LOCAL_RANK="5", WORLD_SIZE="16", MASTER_ADDR="h",
               MASTER_PORT="29400")
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.master_port, launch.launcher) == (
        5, 16, 29400, "torchrun")


def test_no_launcher_is_one_local_rank():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


@pytest.mark.parametrize("name", ["SLURM_LOCALID", "SLURM_NTASKS"])
def test_missing_slurm_variable_is_named(name):
    env = {k: v for k, v in SLURM.items() if k != name}
    with pytest.raises(ConfigError, match=f"{name}=None is not allowed.*missing"):
        read_launch_env(env)


@pytest.mark.parametrize("name,value", [("SLURM_PROCID", "x"), ("SLURM_NTASKS", "0"),
                                        ("SLURM_LOCALID", "-1"), ("SLURM_JOB_ID", "12a")])
def test_bad_slurm_variable_is_named(name, value):
    with pytest.raises(ConfigError, match=f"{name}='{value}' is not allowed"):
        read_launch_env(dict(SLURM, **{name: value}))


def test_rank_beyond_ntasks_and_missing_nodelist_are_errors():
    with pytest.raises(ConfigError, match="SLURM_PROCID=8 .*less than SLURM_NTASKS=8"):
        read_launch_env(dict(SLURM, SLURM_PROCID="8"))
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST=None.*MASTER_ADDR is not set"):
        read_launch_env(env)
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST='n\\[1-'"):
        read_launch_env(dict(SLURM, SLURM_JOB_NODELIST="n[1-"))


@pytest.mark.parametrize("spec,hosts", [
    ("node001", ["node001"]),
    ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
    ("a[8-10],b,c[2]", ["a8", "a9", "a10", "b", "c2"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("gpu-[09-11].ib", ["gpu-09.ib", "gpu-10.ib", "gpu-11.ib"]),
])
def test_expand_hostlist_like_scontrol(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["", "n[3-1]", "n[a-b]", "n]1["])
def test_expand_hostlist_rejects_garbage(spec):
    with pytest.raises(ValueError):
        expand_hostlist(spec)


TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env,match", [
    # used to wait for the 10-minute rendezvous timeout
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "MASTER_ADDR=None .*WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h"}, "MASTER_PORT=None .*WORLD_SIZE=2"),
    ({"WORLD_SIZE": "1", "RANK": "3"}, "RANK=3 .*less than WORLD_SIZE=1"),
    # used to be a ValueError traceback, or accepted
    (dict(TORCHRUN, MASTER_PORT="99999"), "MASTER_PORT='99999' .*1..65535"),
    (dict(TORCHRUN, MASTER_PORT="http"), "MASTER_PORT='http'"),
    (dict(TORCHRUN, RANK="-1"), "RANK='-1' .*>= 0"),
    (dict(TORCHRUN, WORLD_SIZE="0"), "WORLD_SIZE='0' .*>= 1"),
    (dict(TORCHRUN, WORLD_SIZE="two"), "WORLD_SIZE='two'"),
    ({"RANK": "0"}, "WORLD_SIZE=None .*missing while RANK is set"),
    ({"WORLD_SIZE": "1"}, "RANK=None .*missing while WORLD_SIZE is set"),
    (dict(TORCHRUN, LOCAL_RANK="x"), "LOCAL_RANK='x'"),
    (dict(TORCHRUN, LOCAL_WORLD_SIZE="1"), "LOCAL_RANK=1 .*less than LOCAL_WORLD_SIZE=1"),
])
def test_bad_torchrun_variables_are_named(env, match):
    with pytest.raises(ConfigError, match=match):
        read_launch_env(env)


def test_torchrun_variables_are_read():
    launch = read_launch_env(TORCHRUN)
    assert (launch.rank, launch.local_rank, launch.world_size, launch.master_addr,
            launch.master_port, launch.launcher) == (1, 1, 2, "10.0.0.1", 29500, "torchrun")


def test_one_process_needs_no_rendezvous_variables():
    launch = read_launch_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert (launch.rank, launch.local_rank, launch.master_addr) == (0, 0, "127.0.0.1")
    assert 0 < launch.master_port < 65536


def test_local_rank_is_never_a_global_rank_on_another_node():
    """Regression: LOCAL_RANK fell back to RANK, i.e. cuda:9 on node 2 of an 8-GPU job."""
    multi = {"RANK": "9", "WORLD_SIZE": "16", "MASTER_ADDR": "node001", "MASTER_PORT": "29500"}
    with pytest.raises(ConfigError, match="LOCAL_RANK=None .*may span nodes"):
        read_launch_env(multi)
    assert read_launch_env(dict(multi, LOCAL_WORLD_SIZE="8")).local_rank == 1
    assert read_launch_env(dict(multi, LOCAL_RANK="1")).local_rank == 1
    # a loopback rendezvous keeps every rank on this node: RANK is the local rank
    assert read_launch_env(dict(multi, MASTER_ADDR="127.0.0.1")).local_rank == 9
