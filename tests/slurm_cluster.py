"""A real, small SLURM cluster for tests: one slurmctld and two slurmd (n1, n2).

Everything (munge key and socket, slurm.conf, state, spool, logs, pidfiles,
job output) lives under a fresh temporary directory; the ports are picked free
at start, so several clusters (a stale previous run, another test session) can
coexist on one host.  The daemons are stopped by the pids in their pidfiles.

Usage::

    from slurm_cluster import SlurmCluster, slurm_available

    ok, why = slurm_available()
    with SlurmCluster() as cluster:
        job = cluster.submit("job.sh", sbatch_opts=["-N", "2"])
        cluster.wait_state(job, {"COMPLETED"}, timeout=60)

Notes on the generated slurm.conf (Slurm 22.05, Debian build):

* Each node declares ``CPUs=2`` (default); with ``SlurmdParameters=config_overrides``
  a node may declare more CPUs than the host has (both slurmd share its cores).
  2 CPUs per node lets both a 2-node x 1-task job and a 1-node x 2-task job run.
* ``AuthInfo=...,cred_expire=N`` sets how long a requeued job waits before it
  may start again (Slurm's default 120 s).  The default here is 10 s;
  ``release(job_id)`` (``scontrol update JobId=X StartTime=now``) skips the
  wait entirely.
* No accounting database: ``sacct`` does not work.  Finished jobs stay visible
  to ``scontrol show job`` for ``MinJobAge`` seconds (3600 here).
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
BIN_DIRS = ("/usr/bin", "/usr/local/bin", "/bin")

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")

# Job states after which a job will not change any more (unless requeued by hand).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


class SlurmClusterError(RuntimeError):
    """The test cluster could not start, or a job did not behave."""


def _search_path() -> str:
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    for d in (*SBIN_DIRS, *BIN_DIRS):
        if d not in parts:
            parts.append(d)
    return os.pathsep.join(parts)


def _which(name: str) -> str | None:
    return shutil.which(name, path=_search_path())


def slurm_available() -> tuple[bool, str]:
    """Whether a real cluster can be started here: (ok, reason when not)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return False, "SLURM test cluster needs a POSIX host"
    if os.geteuid() != 0:
        return False, "SLURM test cluster needs root (SlurmUser=root, slurmd runs jobs as root)"
    missing = [n for n in (*DAEMONS, *CLIENTS) if _which(n) is None]
    if missing:
        return False, "SLURM/munge binaries not found: " + ", ".join(missing)
    return True, ""


def _free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (kept bound until all are picked)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            return False
    except (OSError, IndexError):
        pass
    return True


def _kill_pids(pids: Iterable[int], grace: float = 5.0) -> list[int]:
    """TERM, wait up to grace seconds, then KILL; returns pids still alive."""
    pids = [p for p in set(pids) if p > 1 and p != os.getpid()]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        if _pid_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _pid_alive(p)]


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(lines[-n:])


def parse_scontrol_oneliner(text: str) -> dict[str, str]:
    """Parse one `scontrol show ... -o` line (Key=Value pairs; values may hold spaces
    only in a few fields such as Command/WorkDir, which we handle by splitting on
    ' Key=' boundaries)."""
    text = text.strip()
    out: dict[str, str] = {}
    # Split on whitespace followed by Key= (Key: letters, digits, _, :, /, .).
    for m in re.finditer(r"(?:^|\s)([A-Za-z][\w:/.\-]*)=(.*?)(?=\s[A-Za-z][\w:/.\-]*=|$)", text):
        out[m.group(1)] = m.group(2)
    return out


class SlurmCluster:
    """A real single-host SLURM cluster (controller + nodes) under a temp dir."""

    def __init__(
        self,
        nodes: Sequence[str] = ("n1", "n2"),
        cpus_per_node: int = 2,
        real_memory_mb: int = 1000,
        cred_expire: int = 10,
        base_dir: str | os.PathLike | None = None,
        start_timeout: float = 30.0,
        keep_dir: bool = False,
        extra_conf: Sequence[str] = (),
    ) -> None:
        self.nodes = list(nodes)
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.cred_expire = cred_expire
        self._base_dir = base_dir
        self.start_timeout = start_timeout
        self.keep_dir = keep_dir or bool(os.environ.get("SLURM_TEST_KEEP_DIR"))
        self.extra_conf = list(extra_conf)
        self.tag = uuid.uuid4().hex[:8]
        self.cluster_name = f"t{self.tag}"
        self.root: Path | None = None
        self.conf_path: Path | None = None
        self.munge_socket: Path | None = None
        self.ctld_port: int | None = None
        self.node_ports: dict[str, int] = {}
        self.started = False
        self._env: dict[str, str] = {}

    # ------------------------------------------------------------------ paths
    def _p(self, *parts: str) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root.joinpath(*parts)

    @property
    def job_dir(self) -> Path:
        """A scratch directory for job scripts and output (default cwd of submit)."""
        return self._p("jobs")

    def pidfiles(self) -> dict[str, Path]:
        d = {"munged": self._p("run", "munged.pid"), "slurmctld": self._p("run", "slurmctld.pid")}
        for n in self.nodes:
            d[f"slurmd-{n}"] = self._p("run", f"slurmd-{n}.pid")
        return d

    def logfiles(self) -> dict[str, Path]:
        d = {"munged": self._p("log", "munged.log"), "slurmctld": self._p("log", "slurmctld.log")}
        for n in self.nodes:
            d[f"slurmd-{n}"] = self._p("log", f"slurmd-{n}.log")
        return d

    # -------------------------------------------------------------------- env
    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (and, via --export=ALL, for jobs)."""
        return dict(self._env)

    def _make_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Drop anything that could point clients at another cluster.
        for k in list(env):
            if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")):
                del env[k]
        env["SLURM_CONF"] = str(self.conf_path)
        env["PATH"] = _search_path()
        env["HWR_SLURM_TEST_CLUSTER"] = self.tag  # marker: lets stop() find strays
        return env

    # ---------------------------------------------------------------- config
    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1,batch_sched_delay=0,"
            "sched_min_interval=0,default_queue_depth=100",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "JobRequeue=1",
            "ReturnToService=2",
            "MinJobAge=3600",
            "KillWait=2",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "UnkillableStepTimeout=30",
            "CompleteWait=0",
            "Waittime=0",
            "OverTimeLimit=0",
            "MaxJobCount=10000",
            f"MailProg={shutil.which('true') or '/bin/true'}",
            f"PlugStackConfig={r / 'etc' / 'plugstack.conf'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for n in self.nodes:
            lines.append(
                f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 "
                f"Port={self.node_ports[n]} CPUs={self.cpus_per_node} "
                f"RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
            "MaxTime=INFINITE State=UP OverSubscribe=NO"
        )
        lines.extend(self.extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")
        (r / "etc" / "plugstack.conf").write_text("")

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "SlurmCluster":
        if self.started:
            return self
        ok, why = slurm_available()
        if not ok:
            raise SlurmClusterError(why)
        last_err: Exception | None = None
        for attempt in range(3):  # a picked port may be grabbed before we bind it
            try:
                self._start_once()
                self.started = True
                atexit.register(self._atexit_stop)  # safety net if stop() is never called
                return self
            except SlurmClusterError as e:
                last_err = e
                self._stop_daemons()
                if not self.keep_dir and self.root is not None:
                    shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
                if "Address already in use" not in str(e):
                    break
        raise last_err  # type: ignore[misc]

    def _start_once(self) -> None:
        base = self._base_dir
        if base is not None:
            Path(base).mkdir(parents=True, exist_ok=True)
        # Short prefix: the munge socket path must fit in sun_path (108 bytes).
        self.root = Path(tempfile.mkdtemp(prefix=f"slurm-{self.tag}-", dir=base))
        for d in ("etc", "state", "spool", "run", "log", "munge", "jobs"):
            self._p(d).mkdir(mode=0o700)
        for n in self.nodes:
            self._p("spool", n).mkdir(mode=0o700)
        # munged wants its socket directory searchable by all.
        os.chmod(self.root, 0o711)
        os.chmod(self._p("munge"), 0o711)
        os.chmod(self._p("jobs"), 0o755)

        self.conf_path = self._p("etc", "slurm.conf")
        self.munge_socket = self._p("munge", "munge.socket")
        ports = _free_ports(1 + len(self.nodes))
        self.ctld_port = ports[0]
        self.node_ports = dict(zip(self.nodes, ports[1:]))
        self._write_conf()
        self._env = self._make_env()

        # munge key: 1 KiB random, root-owned, mode 0400
        key = self._p("munge", "munge.key")
        with open("/dev/urandom", "rb") as src:
            data = src.read(1024)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(key, 0o400)

        self._daemon(
            "munged",
            [
                _which("munged"),
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.pidfiles()['munged']}",
                f"--log-file={self.logfiles()['munged']}",
                f"--seed-file={self._p('munge', 'munged.seed')}",
                "--num-threads=2",
                "--force",
            ],
        )
        self._wait_for(lambda: self.munge_socket.exists(), "munged socket")
        self._daemon("slurmctld", [_which("slurmctld"), "-f", str(self.conf_path)])
        self._wait_for(self._ctld_responds, "slurmctld to answer")
        for n in self.nodes:
            self._daemon(f"slurmd-{n}", [_which("slurmd"), "-f", str(self.conf_path), "-N", n])
        self._wait_for(self._nodes_idle, "all nodes idle in sinfo")

    def _daemon(self, name: str, argv: list[str]) -> None:
        """Start a self-daemonising program; wait for its pidfile."""
        r = subprocess.run(
            argv,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=self.start_timeout,
            cwd=self.root,
        )
        if r.returncode != 0:
            raise SlurmClusterError(
                f"{name} failed to start (rc={r.returncode}): {shlex.join(argv)}\n"
                f"{r.stdout}\n{self.diagnostics()}"
            )
        pidfile = self.pidfiles()[name]

        def ready() -> bool:
            pid = self._read_pid(pidfile)
            return pid is not None and _pid_alive(pid)

        self._wait_for(ready, f"{name} pidfile {pidfile}")

    @staticmethod
    def _read_pid(pidfile: Path) -> int | None:
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _ctld_responds(self) -> bool:
        r = self.run(["scontrol", "ping"], check=False, timeout=10)
        return r.returncode == 0 and "UP" in r.stdout

    def node_states(self) -> dict[str, str]:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
        out: dict[str, str] = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def _nodes_idle(self) -> bool:
        st = self.node_states()
        return all(st.get(n, "").rstrip("*").lower() == "idle" for n in self.nodes)

    def _wait_for(self, pred, what: str, timeout: float | None = None) -> None:
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if pred():
                return
            # Fail fast if a daemon that should be running has died.
            dead = [
                name
                for name, pf in self.pidfiles().items()
                if pf.exists() and (pid := self._read_pid(pf)) is not None and not _pid_alive(pid)
            ]
            if dead or time.monotonic() > deadline:
                reason = f"daemon(s) died: {', '.join(dead)}" if dead else f"timed out after {timeout:.0f}s"
                raise SlurmClusterError(
                    f"SLURM test cluster: waiting for {what}: {reason}\n{self.diagnostics()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def diagnostics(self) -> str:
        """Node states and the tails of all daemon logs (for error messages)."""
        parts = [f"cluster dir: {self.root}", f"conf: {self.conf_path}"]
        if self.root is None:
            return "\n".join(parts)
        try:
            if self.conf_path and self.conf_path.exists() and self._p("run", "slurmctld.pid").exists():
                parts.append(f"sinfo: {self.node_states()}")
        except Exception as e:  # noqa: BLE001 - diagnostics must not raise
            parts.append(f"sinfo failed: {e}")
        for name, path in self.logfiles().items():
            parts.append(f"----- {name} log ({path}) -----\n{_tail(path)}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel jobs, stop all daemons by pid, kill stray job processes, clean up."""
        if self.root is None:
            return
        if self.started:
            try:
                ids = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split()
                if ids:
                    self.run(["scancel", *ids], check=False, timeout=10)
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline:
                        if not self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split():
                            break
                        time.sleep(0.2)
            except Exception:  # noqa: BLE001 - best effort; we kill by pid anyway
                pass
        alive = self._stop_daemons()
        alive += _kill_pids(self._stray_pids())
        self.started = False
        atexit.unregister(self._atexit_stop)
        if alive:
            raise SlurmClusterError(f"SLURM test cluster: processes survived SIGKILL: {alive}")
        if not self.keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _atexit_stop(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001
            pass

    def _stop_daemons(self) -> list[int]:
        if self.root is None:
            return []
        pf = self.pidfiles()
        # slurmd first, then slurmctld, munged last (the others talk to it while exiting).
        order = [k for k in pf if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        alive: list[int] = []
        for name in order:
            pid = self._read_pid(pf[name])
            if pid is not None:
                alive += _kill_pids([pid], grace=10.0)
        return alive

    def _stray_pids(self) -> list[int]:
        """Processes that carry this cluster's marker (slurmstepd, job steps)."""
        marker = f"HWR_SLURM_TEST_CLUSTER={self.tag}".encode()
        conf = f"SLURM_CONF={self.conf_path}".encode()
        me = os.getpid()
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == me:
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if marker in env or conf in env:
                out.append(int(d))
        return out

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------- clients
    def run(
        self,
        cmd: Sequence[str],
        check: bool = True,
        timeout: float = 30.0,
        cwd: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, scontrol, ...) against this cluster."""
        full_env = self.env
        if env:
            full_env.update(env)
        r = subprocess.run(
            list(cmd),
            env=full_env,
            cwd=cwd if cwd is not None else (self.job_dir if self.root else None),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise SlurmClusterError(
                f"command failed (rc={r.returncode}): {shlex.join(cmd)}\n"
                f"stdout: {r.stdout}\nstderr: {r.stderr}"
            )
        return r

    def submit(
        self,
        script_path: str | os.PathLike,
        args: Sequence[str] = (),
        sbatch_opts: Sequence[str] = (),
        cwd: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """sbatch a script; returns the job id (as a string)."""
        cmd = ["sbatch", "--parsable", *sbatch_opts, str(script_path), *args]
        r = self.run(cmd, cwd=cwd, env=env)
        job_id = r.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmClusterError(f"unexpected sbatch output: {r.stdout!r} {r.stderr!r}")
        return job_id

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """Parsed `scontrol show job -o JOBID` (first record: for the batch job itself)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if r.returncode != 0 or not r.stdout.strip():
            raise SlurmClusterError(f"job {job_id} unknown: {r.stderr.strip() or r.stdout.strip()}")
        return parse_scontrol_oneliner(r.stdout.strip().splitlines()[0])

    def job_state(self, job_id: str | int) -> str:
        return self.job_info(job_id).get("JobState", "")

    def wait_state(
        self,
        job_id: str | int,
        states: str | Iterable[str],
        timeout: float = 60.0,
        poll: float = 0.25,
    ) -> str:
        """Poll until the job's state is one of `states`; returns that state.

        Raises SlurmClusterError on timeout, or at once if the job reaches a terminal
        state that is not among `states` (with the job's record and output tail)."""
        wanted = {states} if isinstance(states, str) else set(states)
        wanted = {s.upper() for s in wanted}
        deadline = time.monotonic() + timeout
        state = ""
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                raise SlurmClusterError(
                    f"job {job_id} ended {state}, wanted {sorted(wanted)}\n{self._job_report(info)}"
                )
            if time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"job {job_id} still {state} after {timeout:.0f}s, wanted {sorted(wanted)}\n"
                    f"{self._job_report(info)}\n{self.diagnostics()}"
                )
            time.sleep(poll)

    def _job_report(self, info: Mapping[str, str]) -> str:
        lines = [f"{k}={v}" for k, v in info.items()]
        for key in ("StdOut", "StdErr"):
            p = info.get(key)
            if p and Path(p).exists():
                lines.append(f"----- {key} {p} -----\n{_tail(Path(p))}")
        return "\n".join(lines)

    def release(self, job_id: str | int) -> None:
        """Let a pending (e.g. requeued) job start now instead of after its BeginTime.

        Not within the second of the requeue: slurmctld then revokes the new start's job
        credential ("Job credential revoked") and the job fails at once."""
        time.sleep(2)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def signal_batch(self, job_id: str | int, sig: str = "USR1") -> None:
        """Send a signal to the batch shell of a running job."""
        self.run(["scancel", "--batch", f"--signal={sig}", str(job_id)])
