"""Where this process sits in the job, read from the launcher's environment.

torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; a plain
``python launch/pretrain_gpt_mtp.py`` is a single rank on a free local port.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Mapping

from mtp_megatron.config import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    """Rank and rendezvous from torchrun's variables, or a single local rank."""
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return LaunchEnv(0, 0, 1, "127.0.0.1", free_port())
    try:
        return LaunchEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            "RANK/WORLD_SIZE", {k: env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
            "integers set by torchrun (or neither, for one process)",
            f"bad launcher variable {exc}",
        ) from None
