"""The Slurm the tests submit to: a real two-node cluster started on this one machine
(:class:`Cluster`, Debian's slurm-wlm 22.05), or a site's own (:class:`SiteCluster`).

Each node is a holder process in its own network + UTS + mount namespaces (``unshare``),
with its hostname, a private ``/etc/hosts`` (node1/node2 must resolve inside jobs: the
rendezvous and gloo look them up) and one end of a veth pair. slurmctld and node1's
slurmd run in node1's namespaces, node2's slurmd in node2's, clients (sbatch, scontrol,
submit.sh) in node1's. The PID namespace is the machine's: the tests see every job
process. munged is this session's own (socket and key in the session directory).

No named network namespaces (``ip netns add``) and no global mounts: the namespaces
vanish with their last process, so :meth:`Cluster.stop` (kill by PID) leaves nothing
behind. A session that crashed left a record in :data:`SESSIONS`; the next start kills
what that record names (checking each PID's command line first) and removes its files.

Facts from the real cluster that shape this (see docs/cluster.md): ``ip netns exec``
remounts /sys and slurmd then fails to start its cgroup plugin (hence nsenter/unshare);
slurmd needs its spool directory to exist; ``cred_expire=10`` and ``sched_interval=5``
bring a requeued job back in ~15 s instead of ~150 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue",
         "scancel", "nsenter", "unshare", "ip")
SESSIONS = "/tmp/mtp-slurm-sessions"
NODES = {"node1": "10.222.0.1", "node2": "10.222.0.2"}
CPUS_PER_NODE = 8  # 4x the machine's cores per node: jobs that mostly sleep run side by side

SLURM_CONF = """\
ClusterName=mtptest
SlurmctldHost=node1({node1})
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/sock,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
StateSaveLocation={d}/state/ctld
SlurmdSpoolDir={d}/state/slurmd.%n
SlurmctldPidFile={d}/state/slurmctld.pid
SlurmdPidFile={d}/state/slurmd.%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=node1 NodeAddr={node1} CPUs={cpus} State=UNKNOWN
NodeName=node2 NodeAddr={node2} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""


SITE_ENV = "MTP_SLURM_TEST_SITE"  # 1: use the Slurm on PATH instead of starting one
SITE_DIR_ENV = "MTP_SLURM_TEST_DIR"  # site mode: a directory every node sees
SITE_ARGS_ENV = "MTP_SLURM_TEST_SBATCH_ARGS"  # site mode: e.g. "--partition=debug --account=p"
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE")


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here (not root, packages missing): the tests skip with this."""


def missing_requirements() -> Optional[str]:
    """Why a cluster cannot start on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed: run .ci/install_slurm.sh "
                "(apt: munge slurmctld slurmd slurm-client)")
    return None


class _Jobs:
    """Job queries shared by both kinds of cluster (they only need :meth:`run`)."""

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        fields: Dict[str, str] = {}
        for token in out.split():
            if "=" in token:
                key, value = token.split("=", 1)
                fields[key] = value
        return fields

    def wait_job(self, job_id: str, timeout: float) -> Dict[str, str]:
        """Wait until the job is in a final state (a requeued job is not), then until
        nothing of it is left on any node."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                break
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after "
                                   f"{timeout:.0f} s\n{self.logs()}")
            time.sleep(0.5)
        _wait_for(lambda: not self.leftovers(job_id), 60, f"job {job_id}'s processes to end",
                  lambda: "\n".join(self.leftovers(job_id)))
        return info


@dataclass
class Cluster(_Jobs):
    root: str  # session directory: config, state, logs, munge socket
    pids: Dict[str, int] = field(default_factory=dict)  # role -> PID
    procs: List[subprocess.Popen] = field(default_factory=list)

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def start(cls) -> "Cluster":
        why = missing_requirements()
        if why:
            raise ClusterUnavailable(why)
        clean_stale_sessions()
        root = tempfile.mkdtemp(prefix="mtp-slurm-")
        cluster = cls(root)
        try:
            cluster._start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self) -> None:
        os.chmod(self.root, 0o755)  # munged wants every directory above its socket searchable
        for sub in ("munge", "state/ctld", "state/slurmd.node1", "state/slurmd.node2", "log"):
            os.makedirs(os.path.join(self.root, sub), mode=0o755, exist_ok=True)
        self._write_record()
        self._start_munged()
        with open(self.conf, "w") as fh:
            fh.write(SLURM_CONF.format(d=self.root, cpus=CPUS_PER_NODE, **NODES))
        with open(os.path.join(self.root, "hosts"), "w") as fh:
            fh.write("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in NODES.items()))
        for node in NODES:
            self._start_holder(node)
        self._connect_nodes()
        self._spawn("slurmctld", self.in_node("node1", ["slurmctld", "-D"]))
        for node in NODES:
            self._spawn(f"slurmd.{node}", self.in_node(node, ["slurmd", "-D", "-N", node]))
        self._wait_idle()

    def stop(self) -> None:
        """Kill every process of this cluster by PID (daemons, slurmstepd, job processes,
        the namespaces' holders: all carry its SLURM_CONF), then remove the session
        directory. Safe to call twice, and after a failed start."""
        deadline = time.time() + 15
        while True:
            pids = self.processes()
            for pid in pids:
                _kill(pid)
            for proc in self.procs:
                with _suppress_oserror():
                    proc.poll()  # reap what is ours
            if not pids or time.time() > deadline:
                break
            time.sleep(0.1)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.pids.clear()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        with _suppress_oserror():
            os.remove(self._record_path())
        with _suppress_oserror():
            os.rmdir(SESSIONS)  # only when no other session has a record there

    # -- the pieces ---------------------------------------------------------------------

    @property
    def conf(self) -> str:
        return os.path.join(self.root, "slurm.conf")

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ, SLURM_CONF=self.conf)
        env.update(extra or {})
        return env

    def _spawn(self, role: str, cmd: Sequence[str]) -> None:
        log = open(os.path.join(self.root, "log", f"{role}.out"), "w")
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self.env(), cwd=self.root)
        log.close()
        self.procs.append(proc)
        self.pids[role] = proc.pid
        self._write_record()

    def _start_munged(self) -> None:
        key = os.path.join(self.root, "munge.key")
        subprocess.run(["mungekey", "-c", "-k", key], check=True, capture_output=True)
        self._spawn("munged", [
            "munged", "-F", f"--socket={self.root}/munge/sock", f"--key-file={key}",
            f"--log-file={self.root}/log/munged.log", f"--pid-file={self.root}/munged.pid",
            f"--seed-file={self.root}/munged.seed"])
        _wait_for(lambda: os.path.exists(f"{self.root}/munge/sock"), 10, "munged's socket")

    def _start_holder(self, node: str) -> None:
        """A process that owns the node's namespaces: hostname, private /etc/hosts."""
        hosts = os.path.join(self.root, "hosts")
        self._spawn(f"holder.{node}", [
            "unshare", "--net", "--uts", "--mount", "--propagation", "private", "sh", "-c",
            f"mount --bind {hosts} /etc/hosts && hostname {node} && exec sleep 86400"])

        def ready():
            return _read(f"/proc/{self.pids[f'holder.{node}']}/cmdline").startswith("sleep")
        _wait_for(ready, 10, f"{node}'s namespaces")

    def _connect_nodes(self) -> None:
        """A veth pair between the two nodes' network namespaces, one address each."""
        a, b = (self.pids[f"holder.{n}"] for n in NODES)
        # Both ends created inside the namespaces: nothing is added to the machine's own
        # network, and the pair goes away with the namespaces.
        devs = ("eth-node1", "eth-node2")
        _run(["ip", "link", "add", devs[0], "netns", str(a), "type", "veth",
              "peer", "name", devs[1], "netns", str(b)])
        for addr, holder, dev in zip(NODES.values(), (a, b), devs):
            inside = ["nsenter", "-t", str(holder), "-n", "ip"]
            _run(inside + ["addr", "add", f"{addr}/24", "dev", dev])
            _run(inside + ["link", "set", "lo", "up"])
            _run(inside + ["link", "set", dev, "up"])

    def in_node(self, node: str, cmd: Sequence[str], cwd: Optional[str] = None) -> List[str]:
        """``cmd`` run inside ``node``'s namespaces (the machine's PID namespace)."""
        holder = self.pids[f"holder.{node}"]
        return ["nsenter", "-t", str(holder), "-n", "-u", "-m",
                f"--wd={cwd or os.getcwd()}", *cmd]

    def run(self, cmd: Sequence[str], *, cwd: Optional[str] = None, check: bool = True,
            env: Optional[Dict[str, str]] = None, timeout: float = 60,
            ) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, submit.sh, ...) on node1."""
        done = subprocess.run(self.in_node("node1", cmd, cwd), capture_output=True, text=True,
                              env=self.env(env), timeout=timeout, cwd=cwd)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def _wait_idle(self) -> None:
        def idle():
            out = self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.split()
            return out == ["idle"]
        _wait_for(idle, 30, "both nodes idle", self.logs)

    # -- jobs -----------------------------------------------------------------------------

    sbatch_args = ("--oversubscribe",)  # test jobs share the nodes (CPUS_PER_NODE)
    queue_wait = 0.0  # seconds a job may wait in the queue: none here

    def reference_prefix(self, nproc: int) -> List[str]:
        """How a one-machine reference run is started: here, on this machine."""
        return []

    def leftovers(self, job_id: str) -> List[str]:
        """What is left of a job on either node: its processes (batch shell, srun, tasks,
        workers, slurmstepd), by PID."""
        return [f"pid {pid}: {_read(f'/proc/{pid}/cmdline')[:200]}"
                for pid in self.processes(job_id)]

    def processes(self, job_id: Optional[str] = None) -> List[int]:
        """Live processes of this cluster (their environment names its SLURM_CONF), or of
        one of its jobs."""
        mine = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    environ = fh.read().split(b"\0")
            except OSError:
                continue
            if mine not in environ or _read(f"/proc/{entry}/stat").split(" ")[2:3] == ["Z"]:
                continue
            if job_id is None or f"SLURM_JOB_ID={job_id}".encode() in environ or \
                    _read(f"/proc/{entry}/cmdline").startswith(f"slurmstepd: [{job_id}."):
                pids.append(int(entry))
        return pids

    def logs(self) -> str:
        """The daemons' logs, tails, for failure messages."""
        out = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            text = _read(os.path.join(self.root, "log", name))
            out.append(f"--- {name}\n{text[-3000:]}")
        return "\n".join(out)

    # -- crash recovery -----------------------------------------------------------------

    def _record_path(self) -> str:
        return os.path.join(SESSIONS, f"{os.getpid()}.json")

    def _write_record(self) -> None:
        os.makedirs(SESSIONS, exist_ok=True)
        cmdlines = {role: _read(f"/proc/{pid}/cmdline") for role, pid in self.pids.items()}
        record = {"owner": os.getpid(), "root": self.root, "pids": self.pids,
                  "cmdlines": cmdlines}
        with open(self._record_path(), "w") as fh:
            json.dump(record, fh)


class SiteCluster(_Jobs):
    """A site's own Slurm (``MTP_SLURM_TEST_SITE=1``): the tests submit with the sbatch on
    PATH and its configuration, from a directory every node sees (``MTP_SLURM_TEST_DIR``),
    adding ``MTP_SLURM_TEST_SBATCH_ARGS``; nothing is started or stopped. References run
    on a compute node (srun), so that they and the jobs use the same kind of CPU."""

    def __init__(self):
        self.root = os.environ.get(SITE_DIR_ENV, "")
        if not self.root:
            raise ClusterUnavailable(f"{SITE_ENV}=1 needs {SITE_DIR_ENV}=<a directory every "
                                     "node sees> (runs, checkpoints and sbatch output go there)")
        missing = [t for t in ("sbatch", "srun", "scontrol", "squeue", "scancel")
                   if shutil.which(t) is None]
        if missing:
            raise ClusterUnavailable(f"{SITE_ENV}=1 but {', '.join(missing)} not on PATH")
        self.sbatch_args = tuple(os.environ.get(SITE_ARGS_ENV, "").split())
        self.queue_wait = 1800.0  # other users' jobs, and ours one at a time (--exclusive)

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        return dict(os.environ, **(extra or {}))

    def run(self, cmd: Sequence[str], *, cwd: Optional[str] = None, check: bool = True,
            env: Optional[Dict[str, str]] = None, timeout: float = 60,
            ) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env(env),
                              timeout=timeout, cwd=cwd)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def reference_prefix(self, nproc: int) -> List[str]:
        return ["srun", "--nodes=1", "--ntasks=1", f"--cpus-per-task={nproc}",
                *self.sbatch_args]

    def leftovers(self, job_id: str) -> List[str]:
        """Job steps Slurm still lists (the nodes' processes are out of sight here)."""
        out = self.run(["squeue", "-h", "-s", "-j", job_id], check=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    def logs(self) -> str:
        return ""

    def stop(self) -> None:
        pass


def clean_stale_sessions() -> None:
    """Kill what a crashed earlier session left (its owner PID is gone), by the PIDs it
    recorded, each only if its command line is still the recorded one."""
    if not os.path.isdir(SESSIONS):
        return
    for name in os.listdir(SESSIONS):
        path = os.path.join(SESSIONS, name)
        try:
            with open(path) as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            continue
        if _alive(record["owner"]):
            continue
        for role, pid in record["pids"].items():  # e.g. a holder that lost its environ
            if _read(f"/proc/{pid}/cmdline") == record["cmdlines"].get(role, "") != "":
                _kill(pid)
        for pid in Cluster(record["root"]).processes():
            _kill(pid)
        shutil.rmtree(record["root"], ignore_errors=True)
        with _suppress_oserror():
            os.remove(path)


# -- small helpers --------------------------------------------------------------------------

class _suppress_oserror:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int) -> None:
    with _suppress_oserror():
        os.kill(pid, signal.SIGKILL)


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def _wait_for(condition, timeout: float, what: str, details=None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            extra = f"\n{details()}" if details else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(0.2)
