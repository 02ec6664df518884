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
