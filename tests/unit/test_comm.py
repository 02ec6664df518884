"""Device-correct collectives, checked two ways on CPU (issue 10's "how CPU CI can catch it"):

(a) statically: no module of the package but ``runtime/comm.py`` calls a
    ``torch.distributed`` collective, and every tensor factory call in the package says
    ``device=`` (the AST of ``mtp_megatron/`` is walked);
(b) at run time: under ``MTP_MEGATRON_STRICT_DEVICE=1`` a tensor the package makes without
    ``device=`` is on ``meta``, so the pre-fix ``faults.py`` code (``torch.tensor`` +
    ``dist.all_reduce`` + ``.item()``) fails on gloo as it failed under NCCL, while the
    ``comm`` helpers pass; a ``cuda:gloo`` group reproduces the NCCL error itself.
"""

from __future__ import annotations

import ast
import os
from typing import List

import pytest

from tests.dist_utils import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "mtp_megatron")
COMM = os.path.join("mtp_megatron", "runtime", "comm.py")

COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
    "all_gather_object", "all_gather_coalesced", "all_to_all", "all_to_all_single",
    "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter",
    "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "send_object_list", "recv_object_list",
}
# torch's own list of the factories that take a device (torch.utils._device).
FACTORIES = {
    "arange", "as_tensor", "asarray", "empty", "empty_strided", "eye", "full", "linspace",
    "logspace", "ones", "rand", "randint", "randn", "randperm", "range", "scalar_tensor",
    "tensor", "zeros", "tril_indices", "triu_indices",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


class _Aliases(ast.NodeVisitor):
    """Names bound to ``torch``, ``torch.distributed`` and its collectives in a module."""

    def __init__(self):
        self.modules = {"torch": "torch"}  # local name -> module it stands for
        self.functions = {}                # local name -> "torch.distributed.<fn>"

    def visit_Import(self, node):
        for a in node.names:
            if a.name in ("torch", "torch.distributed"):
                self.modules[a.asname or a.name] = a.name

    def visit_ImportFrom(self, node):
        for a in node.names:
            if node.module == "torch" and a.name == "distributed":
                self.modules[a.asname or a.name] = "torch.distributed"
            elif node.module == "torch" and a.name in FACTORIES:
                self.functions[a.asname or a.name] = f"torch.{a.name}"
            elif node.module and node.module.startswith("torch.distributed"):
                self.functions[a.asname or a.name] = f"torch.distributed.{a.name}"


def _resolve(func: ast.AST, aliases: _Aliases) -> str:
    """The full torch name a call's function refers to ("" if not torch)."""
    name = _dotted(func)
    if not name:
        return ""
    head, _, rest = name.partition(".")
    if head in aliases.functions and not rest:
        return aliases.functions[head]
    if head in aliases.modules:
        return aliases.modules[head] + ("." + rest if rest else "")
    return ""


def collective_calls(source: str, filename: str = "<src>") -> List[str]:
    """``file:line name`` of every torch.distributed collective called in ``source``."""
    tree = ast.parse(source, filename)
    aliases = _Aliases()
    aliases.visit(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            full = _resolve(node.func, aliases)
            if full.startswith("torch.distributed.") and full.rsplit(".", 1)[-1] in COLLECTIVES:
                found.append(f"{filename}:{node.lineno} {full}")
    return found


def factories_without_device(source: str, filename: str = "<src>") -> List[str]:
    """``file:line name`` of every torch tensor factory called without ``device=``."""
    tree = ast.parse(source, filename)
    aliases = _Aliases()
    aliases.visit(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            full = _resolve(node.func, aliases)
            if full.count(".") == 1 and full.split(".")[1] in FACTORIES:
                keywords = {k.arg for k in node.keywords}
                if "device" not in keywords and None not in keywords:  # None: **kwargs
                    found.append(f"{filename}:{node.lineno} {full}")
    return found


def _package_sources():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, ROOT), open(path).read()


OLD_FAULTS = '''
import torch
import torch.distributed as dist

def step_is_finite(ok):
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0

def exit_flags(signal_received, minutes, stop):
    flags = torch.tensor([float(signal_received), minutes, float(stop)], dtype=torch.float64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()
'''


def test_no_torch_distributed_collective_outside_comm():
    offenders = [hit for path, src in _package_sources() if path != COMM
                 for hit in collective_calls(src, path)]
    assert offenders == [], "call mtp_megatron.runtime.comm instead:\n" + "\n".join(offenders)


def test_every_package_tensor_factory_names_its_device():
    offenders = [hit for path, src in _package_sources()
                 for hit in factories_without_device(src, path)]
    assert offenders == [], ("pass device= (the comm/model device, or \"cpu\" for host-side "
                             "tensors):\n" + "\n".join(offenders))


def test_the_rules_catch_the_old_code_and_every_spelling():
    assert [h.split()[1] for h in collective_calls(OLD_FAULTS)] == [
        "torch.distributed.all_reduce", "torch.distributed.all_reduce"]
    assert len(factories_without_device(OLD_FAULTS)) == 2
    spellings = """
import torch
from torch import distributed as d
from torch.distributed import barrier as wait_all
from torch import zeros
torch.distributed.broadcast(x, 0)
d.all_gather_object(out, obj)
wait_all()
zeros(3)
torch.zeros(3, device="cpu")
torch.ones(2, **kw)
"""
    assert [h.split()[1] for h in collective_calls(spellings)] == [
        "torch.distributed.broadcast", "torch.distributed.all_gather_object",
        "torch.distributed.barrier"]
    assert [h.split()[1] for h in factories_without_device(spellings)] == ["torch.zeros"]


def _strict_rank(rank, world_size):
    """Old code vs comm on a strict gloo group, and the NCCL error through ``cuda:gloo``."""
    import torch
    import torch.distributed as dist

    from mtp_megatron.config import CheckpointConfig
    from mtp_megatron.runtime import comm, distributed, strict_device
    from mtp_megatron.training import faults
    from tests.dist_utils import init_ranks
    from tests.reference.harness import tiny_config

    out = {"env": (os.environ.get("CUDA_VISIBLE_DEVICES"),
                   os.environ.get(strict_device.STRICT_ENV)),
           "cuda": torch.cuda.is_available()}
    device = init_ranks(tiny_config(world_size, "/tmp/unused", num_layers=2))
    out["device"], out["strict"] = str(device), strict_device.active()
    old = {"__name__": "mtp_megatron.training.faults"}  # the pre-fix code, as package code
    exec(compile(OLD_FAULTS, "faults.py (before issue 10)", "exec"), old)

    def error_of(fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - the message is the result
            return f"{type(exc).__name__}: {exc}"
        return None

    out["old_strict"] = [error_of(old["step_is_finite"], True),
                         error_of(old["exit_flags"], False, 0.1, False)]
    meta = torch.tensor([1.0])  # made from a package frame? no: this test module's
    out["test_tensor_device"] = str(meta.device)
    pkg = {"__name__": "mtp_megatron.anything"}
    exec("import torch\nt = torch.zeros(2)\nok = torch.zeros(2, device='cpu')", pkg)
    out["pkg_devices"] = (str(pkg["t"].device), str(pkg["ok"].device))
    out["comm_rejects_meta"] = error_of(comm.all_reduce, pkg["t"])
    # The new code under the same strict mode: agreement across ranks.
    out["new_any"] = comm.any_rank(rank == 1)
    out["new_all"] = comm.all_ranks(rank == 1)
    # the hot loop's one agreement (NaN flag + exit flags), on the comm device
    flags = torch.tensor([float(rank == 1), 0.0], dtype=torch.float64, device=comm.device_of())
    out["new_finite"] = faults.agree(flags) == [1.0, 0.0]
    exit_cfg = CheckpointConfig(exit_interval=4)
    out["new_exit"] = [faults.ExitConditions(exit_cfg).check(i) for i in (3, 4)]
    out["max"] = comm.reduce_values([rank, -rank], op="max")
    out["gathered"] = comm.all_gather_object({"rank": rank})
    out["pieces"] = [t.tolist() for t in comm.all_gather(torch.full((2,), rank, device="cpu"))]
    comm.barrier()
    # Without strict mode the old code passes on gloo: CPU CI could not see the bug ...
    strict_device.uninstall()
    out["old_lenient"] = error_of(old["step_is_finite"], True)
    # ... while a group whose CUDA tensors go to gloo has NCCL's exact failure.
    cuda_like = dist.new_group(backend="cuda:gloo")
    out["old_cuda_like"] = error_of(dist.all_reduce, torch.zeros(1, device="cpu"),
                                    dist.ReduceOp.MAX, cuda_like)
    distributed.shutdown()
    return out


@pytest.fixture(scope="module")
def strict():
    return spawn(2, _strict_rank)


@pytest.mark.multirank
def test_test_ranks_hide_cuda_and_run_strict(strict):
    for r in strict:
        assert r["env"] == ("", "1") and not r["cuda"]
        assert r["device"] == "cpu" and r["strict"]


@pytest.mark.multirank
def test_strict_mode_turns_the_old_faults_code_into_the_nccl_failure(strict):
    for r in strict:
        for error in r["old_strict"]:  # c10d's meta kernels pass the collective itself;
            assert error and "meta" in error, error  # reading the result back fails
        assert r["old_lenient"] is None  # the same code on plain gloo: silently fine
        assert "No backend type associated with device type cpu" in r["old_cuda_like"]


@pytest.mark.multirank
def test_strict_mode_touches_only_package_code(strict):
    for r in strict:
        assert r["test_tensor_device"] == "cpu"
        assert r["pkg_devices"] == ("meta", "cpu")
        assert r["comm_rejects_meta"].startswith("DeviceMismatchError")
        assert "MTP_MEGATRON_STRICT_DEVICE" in r["comm_rejects_meta"]


@pytest.mark.multirank
def test_comm_helpers_agree_over_ranks_under_strict_mode(strict):
    for r in strict:
        assert r["new_any"] is True and r["new_all"] is False and r["new_finite"] is True
        assert r["new_exit"] == [None, "--exit-interval 4 reached"]
        assert r["max"] == [1.0, 0.0]
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert r["pieces"] == [[0, 0], [1, 1]]
