"""Where this process sits in the job, read from the launcher's environment.

Three launchers, tried in this order:

- torchrun sets ``RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT`` (another launcher
  may set them too; with ``WORLD_SIZE > 1`` all but ``LOCAL_RANK`` are required, and
  ``LOCAL_RANK`` may be left out only when it can be derived: see ``_local_rank``);
- ``srun`` with one task per GPU (no torchrun) sets ``SLURM_PROCID/SLURM_LOCALID/
  SLURM_NTASKS``; the master is the first host of ``SLURM_JOB_NODELIST`` and the port
  is ``MASTER_PORT`` or one derived from ``SLURM_JOB_ID`` (the same on every task);
- a plain ``python launch/pretrain_gpt_mtp.py`` is a single rank on a free local port.

Every variable is checked before any rendezvous: a missing, non-integer or out-of-range
one raises :class:`ConfigError` naming it (the launcher exits 2), instead of every rank
waiting for the 10-minute rendezvous timeout.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

from mtp_megatron.config import ConfigError

SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 20000  # ports 20000..39999, below Linux's ephemeral range


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str = "torchrun"  # torchrun | slurm | single


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_world_size(env: Mapping[str, str]) -> Tuple[Optional[int], str]:
    """The launcher's world size and the variable it came from, before any other check
    (the config's batch arithmetic needs it): ``WORLD_SIZE`` under torchrun (or whatever
    sets ``RANK``/``WORLD_SIZE``), ``SLURM_NTASKS`` under srun, (None, "") otherwise. The
    one reader of these variables with :func:`read_launch_env`."""
    if "RANK" in env or "WORLD_SIZE" in env:
        name = "WORLD_SIZE"
    elif "SLURM_PROCID" in env or "SLURM_NTASKS" in env:
        name = "SLURM_NTASKS"
    else:
        return None, ""
    if not env.get(name):
        return None, name
    return _int_var(env, name, 1), name


def reported_rank(env: Mapping[str, str], *, local: bool = False) -> str:
    """The global (or, with ``local``, the node-local) rank as the launcher wrote it,
    unchecked: for picking the one process that prints a user error before anything is
    validated. torchrun's variable, else srun's, else "0"."""
    name, slurm_name = ("LOCAL_RANK", "SLURM_LOCALID") if local else ("RANK", "SLURM_PROCID")
    return env.get(name, env.get(slurm_name, "0"))


def read_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    """Rank and rendezvous from torchrun's variables, SLURM's, or a single local rank."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "SLURM_PROCID" in env:
        return _from_slurm(env)
    return LaunchEnv(0, 0, 1, "127.0.0.1", free_port(), launcher="single")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    """torchrun's variables (or any launcher that sets the same), checked like SLURM's.

    ``RANK`` and ``WORLD_SIZE`` come together, with ``0 <= RANK < WORLD_SIZE``. With
    ``WORLD_SIZE > 1`` the rendezvous needs ``MASTER_ADDR`` and ``MASTER_PORT`` (without
    them every rank would wait for the 10-minute timeout). ``LOCAL_RANK`` picks the GPU:
    see :func:`_local_rank` for when it may be left out.
    """
    why = "set by torchrun; launch with torchrun, or set neither RANK nor WORLD_SIZE"
    for name in ("RANK", "WORLD_SIZE"):
        if name not in env:
            other = "WORLD_SIZE" if name == "RANK" else "RANK"
            raise ConfigError(name, None, "an integer", f"missing while {other} is set; {why}")
    world_size = _int_var(env, "WORLD_SIZE", 1, why)
    rank = _int_var(env, "RANK", 0, why)
    if rank >= world_size:
        raise ConfigError("RANK", rank, f"less than WORLD_SIZE={world_size}", why)
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise ConfigError(name, env.get(name), "the rendezvous host and port of rank 0",
                                  f"missing with WORLD_SIZE={world_size}; {why}")
    master_addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = _port(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_port()
    return LaunchEnv(rank=rank, local_rank=_local_rank(env, rank, world_size, master_addr),
                     world_size=world_size, master_addr=master_addr, master_port=port)


def _local_rank(env: Mapping[str, str], rank: int, world_size: int, master_addr: str) -> int:
    """This rank's index on its node (its GPU), from ``LOCAL_RANK`` when set.

    Without ``LOCAL_RANK``: a single process is 0; a rendezvous on a loopback address
    keeps every rank on this node, so it is ``RANK``; ``LOCAL_WORLD_SIZE`` (ranks per
    node, placed node by node as torchrun and srun's block distribution do) gives
    ``RANK mod LOCAL_WORLD_SIZE``. Otherwise the ranks may span nodes, where ``RANK``
    would pick a GPU the node does not have, so it is an error.
    """
    why = "set by torchrun; the rank's GPU on its node"
    local_world = (_int_var(env, "LOCAL_WORLD_SIZE", 1, why)
                   if env.get("LOCAL_WORLD_SIZE") else None)
    if env.get("LOCAL_RANK"):
        local_rank = _int_var(env, "LOCAL_RANK", 0, why)
        if local_world is not None and local_rank >= local_world:
            raise ConfigError("LOCAL_RANK", local_rank,
                              f"less than LOCAL_WORLD_SIZE={local_world}", why)
        return local_rank
    if world_size == 1:
        return 0
    if local_world is not None:
        return rank % local_world
    if master_addr in LOOPBACK:
        return rank
    raise ConfigError(
        "LOCAL_RANK", None, "an integer >= 0",
        f"missing with WORLD_SIZE={world_size} and MASTER_ADDR={master_addr}: the ranks may "
        "span nodes, where RANK would pick the wrong GPU; set LOCAL_RANK (or "
        "LOCAL_WORLD_SIZE, ranks per node), or use torchrun",
    )


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError("MASTER_PORT", text, "a TCP port number 1..65535")
    return int(text)


SLURM_WHY = "set by srun for each task; launch with srun, or use torchrun"


def _int_var(env: Mapping[str, str], name: str, minimum: int, why: str = SLURM_WHY) -> int:
    """An integer launcher variable, or a ConfigError naming it."""
    if name not in env:
        raise ConfigError(name, None, f"an integer >= {minimum}", f"missing; {why}")
    try:
        value = int(env[name])
    except ValueError:
        raise ConfigError(name, env[name], f"an integer >= {minimum}", why) from None
    if value < minimum:
        raise ConfigError(name, env[name], f"an integer >= {minimum}", why)
    return value


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    rank = _int_var(env, "SLURM_PROCID", 0)
    local_rank = _int_var(env, "SLURM_LOCALID", 0)
    world_size = _int_var(env, "SLURM_NTASKS", 1)
    if rank >= world_size:
        raise ConfigError("SLURM_PROCID", rank, f"less than SLURM_NTASKS={world_size}")
    return LaunchEnv(
        rank=rank, local_rank=local_rank, world_size=world_size,
        master_addr=env.get("MASTER_ADDR") or slurm_master_addr(env),
        master_port=slurm_master_port(env), launcher="slurm",
    )


def slurm_master_addr(env: Mapping[str, str]) -> str:
    """The first host of the job's (or step's) node list."""
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST"):
        if env.get(name):
            try:
                return expand_hostlist(env[name])[0]
            except ValueError as exc:
                raise ConfigError(name, env[name], "a SLURM host list like node[001-004,007]",
                                  str(exc)) from None
    raise ConfigError("SLURM_JOB_NODELIST", None, "a SLURM host list like node[001-004,007]",
                      "missing, and MASTER_ADDR is not set either")


def slurm_master_port(env: Mapping[str, str]) -> int:
    """``MASTER_PORT`` if set, else 20000 + SLURM_JOB_ID mod 20000 (same on every task)."""
    if env.get("MASTER_PORT"):
        return _port(env["MASTER_PORT"])
    job = env.get("SLURM_JOB_ID")
    if not job or not job.isdigit():
        raise ConfigError("SLURM_JOB_ID", job, "the integer job id SLURM sets",
                          "needed to derive the rendezvous port when MASTER_PORT is not set")
    return SLURM_PORT_BASE + int(job) % SLURM_PORT_RANGE


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(spec: str) -> List[str]:
    """Expand a SLURM host list: ``a[01-03,7],b`` -> ``[a01, a02, a03, a7, b]``.

    Zero padding follows the range's first bound, like ``scontrol show hostnames``;
    several bracket groups in one name (``r[1-2]n[1-2]``) expand as a product.
    """
    hosts: List[str] = []
    for item in _split_top_level(spec.strip()):
        hosts.extend(_expand_one(item))
    if not hosts:
        raise ValueError("empty host list")
    return hosts


def _split_top_level(spec: str) -> List[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' at position {i}")
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced '['")
    items.append(spec[start:])
    return [item for item in items if item]


def _expand_one(item: str) -> List[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    tails = _expand_one(rest) if rest else [""]
    out = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ValueError(f"bad range {part!r} in {item!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in {item!r}")
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            out.extend(f"{prefix}{n:0{width}d}{tail}" for tail in tails)
    return out
