"""Field helpers shared by the config sections: a flag per field and one error type."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import fields
from typing import Any, Iterable, Optional

# Upper bounds for integer flags, so a typo like --train-iters 10**30 is an error, not a
# run that hangs building a dataset index for 10**31 samples. Iteration counts (flags
# ending in -iters or -interval) stop at MAX_ITERS, 100 million optimizer steps: 100x
# the longest published pretraining runs. Every other integer (sizes, counts, the seed)
# stops at MAX_INT, the int32 range megatron-core, NCCL and numpy's seeding assume.
MAX_ITERS = 10**8
MAX_INT = 2**31 - 1


class ConfigError(ValueError):
    """A user-facing configuration error. The message names the flag, the value given
    and what is allowed; raised before any process group or model exists."""

    def __init__(self, flag: str, value: Any, allowed: str, why: str = ""):
        self.flag, self.value, self.allowed = flag, value, allowed
        reason = f" ({why})" if why else ""
        super().__init__(f"{flag}={value!r} is not allowed{reason}. Allowed: {allowed}.")

    @classmethod
    def unknown(cls, what: str, name: str, candidates: Iterable[str], where: str = ""
                ) -> "ConfigError":
        """An unknown flag, section or key, with the closest valid name."""
        err = cls.__new__(cls)
        err.flag, err.value, err.allowed = name, name, "see --help"
        place = f" in {where}" if where else ""
        ValueError.__init__(err, f"unknown {what} {name!r}{place}.{closest(name, candidates)}")
        return err


def option(default: Any, help: str, *, type: Any = None, choices: Optional[Iterable] = None,
           flag: Optional[str] = None) -> Any:
    """A dataclass field that is also a command-line flag.

    The flag is ``--`` + the field name with dashes (Megatron-LM's spelling) unless
    ``flag`` says otherwise; ``type`` is the scalar type parsed from the command line
    (``bool`` fields become ``store_true`` switches).
    """
    meta = {"help": help, "type": type, "choices": tuple(choices) if choices else None,
            "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def closest(name: str, candidates: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix for an unknown name, or ''."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def int_maximum(flag: str) -> int:
    """The largest value an integer flag takes (see MAX_ITERS and MAX_INT)."""
    return MAX_ITERS if flag.endswith(("-iters", "-interval")) else MAX_INT


def check_int(flag: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    """``minimum <= value <= int_maximum(flag)``, an int (not a bool), or None if allowed."""
    if value is None and allow_none:
        return
    extra = " (or omit it)" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(flag, value, f"an integer >= {minimum}{extra}")
    maximum = int_maximum(flag)
    if value > maximum:
        raise ConfigError(flag, value, f"an integer from {minimum} to {maximum:,}{extra}",
                          "too large to be meant")


def check_float(flag: str, value: Any, minimum: float, *, allow_none: bool = False) -> None:
    import math

    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < minimum:
        raise ConfigError(flag, value, f"a finite number >= {minimum}")


def check_choice(flag: str, value: Any, choices: Iterable, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(flag, value, "one of " + ", ".join(map(str, choices)))


def check_bool(flag: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(flag, value, "true or false")


def check_types(section) -> None:
    """Generic checks from field metadata: bools are bools, choices are respected."""
    for f in fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("type") is bool:
            check_bool(flag_of(f.name), value)
        elif f.metadata.get("choices"):
            check_choice(flag_of(f.name), value, f.metadata["choices"],
                         allow_none=f.default is None)
