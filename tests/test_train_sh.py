"""train.sh: the launch command it builds, a real CPU run through it, and a real SLURM on one and
on two nodes.

The SLURM tests start a private cluster (munged, slurmctld, slurmd from Debian's slurm-wlm, all
state in a temp dir): one node on localhost, or two nodes in their own network namespaces
(`TwoNodeCluster`). They submit `sbatch train.sh` with the tiny preset, send the time-limit signal
and check that the job checkpoints once, requeues itself, resumes and ends with the same weights as
an uninterrupted run. Without slurm-wlm they skip here and fail in CI.

    uv run pytest tests/test_train_sh.py -q
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

import checkpoint
from checkpoint import load_file as load_checkpoint_file

pytestmark = pytest.mark.xdist_group("slurm")  # one worker runs this file: its tests share one SLURM cluster

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SH = ROOT / "train.sh"
MAX_STEPS = 20
# Tiny and short: the 50304-wide output layer dominates a step on CPU (~0.4 s here).
TINY_FLAGS = [
    "--model",
    "tiny",
    "--device",
    "cpu",
    "--micro-batch-size",
    "2",
    "--seq-len",
    "64",
    "--tokens-per-step",
    "256",
    "--max-steps",
    str(MAX_STEPS),
    "--warmup-steps",
    "2",
    "--val-every",
    "4",
    "--val-tokens",
    "1024",
    "--hellaswag-every",
    "0",
    "--sample-every",
    "0",
    "--ckpt-every",
    "1000",
]
SBATCH_OVERRIDES = ["--gpus-per-node=0", "--cpus-per-task=2"]  # the test node has 2 CPUs and no GPU
FINAL_LINE = re.compile(
    r"^train\.sh: (training finished|training failed|training exited 0|stopped after)", re.MULTILINE
)
END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any SLURM job variables (pytest may itself run in a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["OMP_NUM_THREADS"] = "1"  # the same threads (and so the same float sums) in every run
    return {**env, **extra}


def require(*tools: str) -> None:
    """Skip when a SLURM tool is missing; in CI (CI=true) that is a failure, not a skip."""
    missing = [t for t in tools if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        message = f"{', '.join(missing)} not installed: apt-get install --no-install-recommends slurm-wlm munge"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dry_run(args=(), **env: str) -> list[str]:
    out = subprocess.run(
        ["bash", str(TRAIN_SH), *args],
        check=False,
        env=clean_env(DRY_RUN="1", **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


def flag(cmd: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {cmd}"
    return values[0]


def metrics(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return records


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint_file(a)["model"], load_checkpoint_file(b)["model"]
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ between {a} and {b}, e.g. {different[:3]}"


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shards(data_dir) -> Path:
    """The demo corpus as reference-format shards (conftest.py): val shard 000000, train 000001-000003."""
    return data_dir


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, shards) -> Path:
    """The tiny run straight through `bash train.sh` without SLURM (torchrun --standalone, CPU)."""
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(
        ["bash", str(TRAIN_SH), *TINY_FLAGS],
        check=False,
        env=clean_env(LOG_DIR=str(log_dir), DATA_DIR=str(shards), CUDA_VISIBLE_DEVICES=""),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return log_dir


class Cluster:
    """A one-node SLURM on localhost: munged, slurmctld and slurmd with all state under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.env = clean_env(SLURM_CONF=str(root / "slurm.conf"), CUDA_VISIBLE_DEVICES="")
        self.daemons: list[subprocess.Popen] = []
        self.daemon_logs: list = []
        self.jobs: list[str] = []
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(mode=0o755)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
        # cred_expire=5: a requeued job waits this long (default 120 s) before it may start again;
        # sched_interval=1: the scheduler looks at the requeued job within a second of that.
        (root / "slurm.conf").write_text(f"""\
ClusterName=traintest
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SlurmdParameters=config_overrides
NodeName=localhost CPUs=2 RealMemory={mem_mb // 2} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        r = self.root
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={r}/munge/munge.sock",
                f"--key-file={r}/munge/munge.key",
                f"--pid-file={r}/munge/munged.pid",
                f"--seed-file={r}/munge/munged.seed",
                f"--log-file={r}/log/munged.log",
            ],
        )
        self._wait(lambda: (r / "munge" / "munge.sock").exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost"])
        self._wait(
            lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
            60,
            "the node never became idle",
        )

    def _spawn(self, name: str, cmd: list[str]) -> None:
        exe = shutil.which(cmd[0], path=self.env["PATH"] + ":/usr/sbin:/sbin")
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (closed in stop())
        self.daemon_logs.append(log)
        self.daemons.append(subprocess.Popen([exe, *cmd[1:]], env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"{what} (exited: {dead})\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").iterdir()))

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(
            cmd, check=False, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw
        )
        if check and result.returncode != 0:
            pytest.fail(f"{shlex.join(cmd)} failed: {result.stderr}\n{self.logs()}")
        return result

    def sbatch(self, out: Path, args: list[str], **env: str) -> str:
        cmd = ["sbatch", "--parsable", *SBATCH_OVERRIDES, f"--output={out}", str(TRAIN_SH), *args]
        job = self.run(*cmd, env={**self.env, **env}, cwd=ROOT).stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_end(self, job: str, out: Path, timeout: float) -> dict[str, str]:
        """Wait for the job's end: a final state and train.sh's last word (not a requeue)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            text = out.read_text() if out.exists() else ""
            if info.get("JobState") in END_STATES and FINAL_LINE.search(text):
                return info
            time.sleep(0.5)
        pytest.fail(f"job {job} did not end within {timeout} s: {self.job(job)}\n{text[-3000:]}\n{self.logs()}")

    def stop(self) -> None:
        if self.jobs and self.daemons and self.daemons[0].poll() is None:
            self.run("scancel", *self.jobs, check=False)
            deadline = time.monotonic() + 15
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.daemons):  # slurmd, slurmctld, then munged
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.daemon_logs:
            log.close()


class TwoNodeCluster(Cluster):
    """Two SLURM nodes on this machine that look like two hosts: each slurmd runs in its own network
    namespace (one end of a veth pair, 10.77.0.1 / 10.77.0.2, nothing else: traffic stays between
    them), its own UTS namespace (hostname node1 / node2) and mount namespace (where an /etc/hosts
    naming both nodes is bind-mounted), with its own spool, pid and log files. slurmctld runs on node1,
    munged in the root namespace (a unix socket on the shared filesystem). The repo and the temp
    dirs are shared between the nodes, as a cluster filesystem is."""

    NODES = {"node1": "10.77.0.1", "node2": "10.77.0.2"}

    def __init__(self, root: Path):
        super().__init__(root)
        tag = f"gpt2t{os.getpid()}"
        self.netns = {"node1": f"{tag}a", "node2": f"{tag}b"}
        self.created: list[str] = []  # network namespaces to delete
        mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
        conf = (root / "slurm.conf").read_text()
        conf = re.sub(r"^SlurmctldHost=.*$", f"SlurmctldHost=node1({self.NODES['node1']})", conf, flags=re.M)
        conf = re.sub(r"^SlurmdSpoolDir=.*$", f"SlurmdSpoolDir={root}/spool/%n", conf, flags=re.M)
        conf = re.sub(r"^SlurmdPidFile=.*$", f"SlurmdPidFile={root}/slurmd.%n.pid", conf, flags=re.M)
        conf = re.sub(r"^SlurmdLogFile=.*$", f"SlurmdLogFile={root}/log/slurmd.%n.log", conf, flags=re.M)
        conf = re.sub(
            r"^NodeName=.*$",
            "\n".join(
                f"NodeName={name} NodeAddr={addr} CPUs=2 RealMemory={mem_mb // 4} State=UNKNOWN"
                for name, addr in self.NODES.items()
            ),
            conf,
            flags=re.M,
        )
        conf = re.sub(
            r"^PartitionName=.*$",
            "PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP",
            conf,
            flags=re.M,
        )
        (root / "slurm.conf").write_text(conf)
        for name in self.NODES:
            (root / "spool" / name).mkdir()

    def _ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def start(self) -> None:
        (self.root / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n" for name, addr in self.NODES.items())
        )
        a, b = self.netns["node1"], self.netns["node2"]
        try:
            for ns in (a, b):
                self._ip("netns", "add", ns)
                self.created.append(ns)
                self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("link", "add", f"{a}v", "type", "veth", "peer", "name", f"{b}v")
            for name, ns in self.netns.items():
                veth = f"{ns}v"
                self._ip("link", "set", veth, "netns", ns)
                self._ip("-n", ns, "addr", "add", f"{self.NODES[name]}/24", "dev", veth)
                self._ip("-n", ns, "link", "set", veth, "up")
        except (RuntimeError, OSError) as e:
            pytest.skip(f"cannot make network namespaces here ({e}): the two-node test needs root with CAP_NET_ADMIN")
        r = self.root
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={r}/munge/munge.sock",
                f"--key-file={r}/munge/munge.key",
                f"--pid-file={r}/munge/munged.pid",
                f"--seed-file={r}/munge/munged.seed",
                f"--log-file={r}/log/munged.log",
            ],
        )
        self._wait(lambda: (r / "munge" / "munge.sock").exists(), 10, "munged did not create its socket")
        self._spawn_on("node1", "slurmctld", ["slurmctld", "-D", "-i"])
        for name in self.NODES:
            self._spawn_on(name, f"slurmd-{name}", ["slurmd", "-D", "-N", name])
        self._wait(
            lambda: self.run("sinfo", "-h", "-o", "%T %D", check=False).stdout.split() == ["idle", "2"],
            60,
            "the two nodes never became idle",
        )

    def _spawn_on(self, node: str, name: str, cmd: list[str]) -> None:
        """Start a daemon on `node`: in its network namespace, with new UTS and mount namespaces (its
        hostname, the nodes' /etc/hosts). nsenter, not `ip netns exec`: that remounts /sys, and
        slurmd then finds no /sys/fs/cgroup (measured: "slurmd initialization failed")."""
        exe = shutil.which(cmd[0], path=self.env["PATH"] + ":/usr/sbin:/sbin")
        self._spawn(
            name,
            [
                "nsenter",
                f"--net=/run/netns/{self.netns[node]}",
                "unshare",
                "--uts",
                "--mount",
                "--",
                "sh",
                "-c",
                f'mount --bind {self.root}/hosts /etc/hosts && hostname {node} && exec "$0" "$@"',
                exe,
                *cmd[1:],
            ],
        )

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Client commands (sbatch, scontrol, ...) reach slurmctld from node1's network namespace."""
        return super().run("nsenter", f"--net=/run/netns/{self.netns['node1']}", *cmd, check=check, **kw)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for ns in self.created:
                subprocess.run(
                    ["ip", "netns", "del", ns], capture_output=True, timeout=30
                )  # the veth pair goes with it


def slurm_conf_only() -> Cluster:
    return Cluster(Path(tempfile.mkdtemp(prefix="slurm")))  # short path: a unix socket lives there


@pytest.fixture(scope="session")
def slurm_conf():
    """A slurm.conf (no daemons): enough for `scontrol show hostnames` in the dry runs."""
    require("scontrol")
    cluster = slurm_conf_only()
    yield cluster.env["SLURM_CONF"]
    shutil.rmtree(cluster.root, ignore_errors=True)


def running(cluster: Cluster):
    """Start `cluster`, yield it, and stop it and delete its files however the tests end."""
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm():
    require("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
    yield from running(slurm_conf_only())


@pytest.fixture(scope="session")
def slurm_two_nodes():
    require("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "ip", "unshare", "nsenter")
    yield from running(TwoNodeCluster(Path(tempfile.mkdtemp(prefix="slurm2"))))


def started(log_dir: str, trained: bool) -> bool:
    """Has the job's first training step been logged (trained) or its launcher started (else)?"""
    if trained:
        return any(r["type"] == "train" for r in metrics(Path(log_dir)))
    return process_running(log_dir)


def process_running(marker: str) -> bool:
    """Is a launcher or training process (command line with train_gpt2.py and `marker`) running here?"""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # Only Python (torchrun once the `bash -c 'trap "" USR1; exec ...'` wrapper has exec'd it, or
        # a training process): srun's and the wrapper's own command lines name train_gpt2.py too, but
        # until the wrapper has exec'd, USR1 is not ignored yet and would kill the step (a race of
        # the test, which signals in the first milliseconds; SLURM signals 300 s before the limit).
        if not os.path.basename(args[0]).startswith(b"python"):
            continue
        if any(a.endswith(b"train_gpt2.py") for a in args) and marker.encode() in b" ".join(args):
            return True
    return False


# ---- the command train.sh builds -----------------------------------------------------------------
def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(TRAIN_SH)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_sbatch_header_asks_for_the_signal_requeue_and_appended_output():
    directives = [line.split()[1] for line in TRAIN_SH.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert "--signal=B:USR1@300" in directives  # B: only the batch shell gets it; it is the one handler
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert "--ntasks-per-node=1" in directives  # one torchrun launcher per node


def test_one_node_runs_one_process_per_gpu_with_rendezvous_on_the_node(slurm_conf):
    cmd = dry_run(
        ["--max-steps", "100"],
        SLURM_CONF=slurm_conf,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="gpu07",
        SLURM_GPUS_ON_NODE="4",
        SLURM_CPUS_PER_TASK="16",
    )
    assert cmd[0] == "srun"
    assert (
        flag(cmd, "--nodes") == "1" and flag(cmd, "--ntasks-per-node") == "1" and flag(cmd, "--cpus-per-task") == "16"
    )
    assert cmd[cmd.index("-m") + 1] == "torch.distributed.run"
    assert Path(cmd[cmd.index("-m") - 1]) == ROOT / ".venv" / "bin" / "python"
    assert flag(cmd, "--nnodes") == "1" and flag(cmd, "--nproc-per-node") == "4"
    assert flag(cmd, "--rdzv-backend") == "c10d" and flag(cmd, "--rdzv-id") == "4242"
    assert re.fullmatch(r"gpu07:\d+", flag(cmd, "--rdzv-endpoint"))
    script = cmd.index("train_gpt2.py")
    assert cmd[script + 1 :] == ["--log-dir", "log", "--max-steps", "100"]


def test_four_nodes_run_one_launcher_per_node_with_rendezvous_on_the_first(slurm_conf):
    cmd = dry_run(
        ["--log-dir", "runs/b", "--seed", "7"],
        SLURM_CONF=slurm_conf,
        SLURM_JOB_ID="99",
        SLURM_JOB_NUM_NODES="4",
        SLURM_JOB_NODELIST="node[12-13,20],other5",
        SLURM_GPUS_ON_NODE="8",
        MASTER_PORT="29123",
        LOG_DIR="runs/a",
        DATA_DIR="/scratch/shards",
    )
    assert flag(cmd, "--nodes") == "4" and flag(cmd, "--ntasks") == "4" and flag(cmd, "--ntasks-per-node") == "1"
    assert flag(cmd, "--nnodes") == "4" and flag(cmd, "--nproc-per-node") == "8"
    assert flag(cmd, "--rdzv-endpoint") == "node12:29123" and flag(cmd, "--rdzv-id") == "99"
    # the torchrun launcher on each node starts with USR1 ignored, so the signal reaches only training
    launcher = cmd.index("bash")
    assert cmd[launcher : launcher + 3] == ["bash", "-c", 'trap "" USR1; exec "$@"']
    script = cmd.index("train_gpt2.py")
    assert cmd[script + 1 :] == [
        "--log-dir",
        "runs/a",
        "--data-dir",
        "/scratch/shards",
        "--log-dir",
        "runs/b",
        "--seed",
        "7",
    ]


def test_without_slurm_it_runs_standalone_torchrun_on_the_visible_gpus():
    cmd = dry_run(["--demo"], CUDA_VISIBLE_DEVICES="0,1,3")
    assert "srun" not in cmd and "--standalone" in cmd
    assert flag(cmd, "--nproc-per-node") == "3"
    assert cmd[cmd.index("train_gpt2.py") + 1 :] == ["--log-dir", "log", "--demo"]
    cmd = dry_run([], CUDA_VISIBLE_DEVICES="")  # no GPU: one process on CPU
    assert flag(cmd, "--nproc-per-node") == "1"


def test_missing_venv_is_a_one_line_error():
    result = subprocess.run(
        ["bash", str(TRAIN_SH)],
        check=False,
        env=clean_env(PYTHON="/nonexistent/python"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "train.sh: error: no Python at /nonexistent/python: run 'uv sync' in "
        f"{ROOT} first (or set PYTHON)"
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_run_without_slurm_trains_to_the_end(uninterrupted_run):
    records = metrics(uninterrupted_run)
    assert sorted(r["step"] for r in records if r["type"] == "train") == list(range(MAX_STEPS))
    assert [r["world_size"] for r in records if r["type"] == "config"] == [1]
    assert (uninterrupted_run / "model_final.pt").is_file()


# ---- a real SLURM --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_time_limit_signal_checkpoints_requeues_resumes_and_matches_uninterrupted_run(
    uninterrupted_run, slurm, shards, tmp_path
):
    log_dir, out = tmp_path / "log", tmp_path / "slurm.out"
    job = slurm.sbatch(out, TINY_FLAGS, LOG_DIR=str(log_dir), DATA_DIR=str(shards), MAX_REQUEUES="3")

    deadline = time.monotonic() + 150
    while not started(str(log_dir), trained=True):  # signal early: fast machines finish 20 steps in seconds
        assert time.monotonic() < deadline, f"no training steps logged\n{out.read_text() if out.exists() else ''}"
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), out.read_text()
        time.sleep(0.05)
    # What SLURM sends before the time limit (--signal=B:USR1): to the batch shell only. Twice, to
    # show that it is handled once.
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait_end(job, out, timeout=200)
    text = out.read_text()

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "1", text
    assert text.count("train.sh: USR1") == 1, text  # the batch shell forwarded it once
    stops = re.findall(r"SIGUSR1: checkpoint saved at step (\d+)", text)
    assert len(stops) == 1, text  # training checkpointed and stopped once (torchrun did not die of it)
    assert text.count("train.sh: checkpoint saved; requeueing") == 1, text
    stop_step = int(stops[0])
    assert 0 < stop_step < MAX_STEPS
    assert f"resuming from {log_dir / f'model_{stop_step:05d}.pt'} at step {stop_step}" in text
    assert "train.sh: training finished" in text and text.count("train.sh: job ") == 2

    records = metrics(log_dir)
    configs = [r for r in records if r["type"] == "config"]
    assert [c["step"] for c in configs] == [0, stop_step]
    assert configs[1]["resumed_from"] == str(log_dir / f"model_{stop_step:05d}.pt")
    assert sorted({r["step"] for r in records if r["type"] == "train"}) == list(range(MAX_STEPS))
    assert_same_weights(log_dir / "model_final.pt", uninterrupted_run / "model_final.pt")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_finished_crashed_or_capped_job_is_not_requeued_even_when_signalled(uninterrupted_run, slurm, shards, tmp_path):
    """USR1 to a finished run (model_final.pt there), a crash (no data) and a run at its requeue cap
    (MAX_REQUEUES=0): each ends for good, with the exit status that says which."""
    empty = tmp_path / "no_shards"
    empty.mkdir()
    cases = {
        "finished": {"LOG_DIR": str(uninterrupted_run), "DATA_DIR": str(shards)},
        "crashed": {
            "LOG_DIR": str(tmp_path / "crash_log"),
            "DATA_DIR": str(empty),
            "MAX_RESTARTS": "0",
        },  # restarts: test_restarts.py
        "capped": {"LOG_DIR": str(tmp_path / "capped_log"), "DATA_DIR": str(shards), "MAX_REQUEUES": "0"},
    }
    for name, env in cases.items():
        out = tmp_path / f"{name}.out"
        job = slurm.sbatch(out, TINY_FLAGS, **env)
        # Signal once srun runs the launcher; the capped run once it trains, so it stops mid-run.
        deadline = time.monotonic() + 90
        while not started(env["LOG_DIR"], trained=name == "capped") and slurm.job(job)["JobState"] not in END_STATES:
            assert time.monotonic() < deadline, f"{name}: training never started\n{out.read_text()}"
            time.sleep(0.05)
        slurm.run("scancel", "--signal=USR1", "--batch", job, check=False)  # fails only if already over
        info = slurm.wait_end(job, out, timeout=90)
        text = out.read_text()
        assert info["Restarts"] == "0" and "requeueing" not in text, text
        if name == "finished":
            assert "training already finished" in text and "train.sh: training finished" in text, text
            assert info["JobState"] == "COMPLETED", text
        elif name == "crashed":
            assert "train.sh: training failed (exit 1): not requeued" in text, text
            assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", text
        else:
            assert "SIGUSR1: checkpoint saved at step" in text, text
            assert "train.sh: stopped after 0 requeues (MAX_REQUEUES=0): not requeued" in text, text
            assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", text


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_nodes_meet_stop_on_the_time_limit_signal_requeue_and_match_one_process(
    uninterrupted_run, slurm_two_nodes, shards, tmp_path
):
    """`sbatch --nodes=2 train.sh --parallel fsdp`: one torchrun per node, one training process each,
    meeting in the c10d rendezvous on node1 over the veth link, the model sharded over the two
    nodes (FSDP2); USR1 mid-run, each node writes its shard of the DCP checkpoint into the shared log
    dir, requeue, resume on both nodes, and train.sh sees the finished run's model_final/ folder.
    The two ranks compute what one process with 2 micro-steps does, up to the clip factor (the
    norm of two shards vs float32's norm of whole tensors, tests/test_fsdp.py): final weights within
    1e-4 of the one-process run's."""
    cluster = slurm_two_nodes
    log_dir, out = tmp_path / "log", tmp_path / "slurm.out"
    cmd = [
        "sbatch",
        "--parsable",
        "--nodes=2",
        *SBATCH_OVERRIDES,
        f"--output={out}",
        str(TRAIN_SH),
        *TINY_FLAGS,
        "--parallel",
        "fsdp",
    ]
    job = (
        cluster.run(
            *cmd, env={**cluster.env, "LOG_DIR": str(log_dir), "DATA_DIR": str(shards), "MAX_REQUEUES": "3"}, cwd=ROOT
        )
        .stdout.strip()
        .split(";")[0]
    )
    cluster.jobs.append(job)

    deadline = time.monotonic() + 200
    while not started(str(log_dir), trained=True):
        assert time.monotonic() < deadline, (
            f"no training steps logged\n{out.read_text() if out.exists() else ''}\n{cluster.logs()}"
        )
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), out.read_text() + cluster.logs()
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait_end(job, out, timeout=300)
    text = out.read_text()

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text
    assert text.count("2 node(s) x 1 process(es)") == 2, text  # both starts ran on two nodes
    stop_step = int(re.findall(r"SIGUSR1: checkpoint saved at step (\d+)", text)[0])
    assert f"resuming from {log_dir / f'model_{stop_step:05d}'} at step {stop_step}" in text
    assert f"train.sh: training finished: {log_dir / 'model_final'}" in text
    records = metrics(log_dir)
    configs = [r for r in records if r["type"] == "config"]
    assert [c["world_size"] for c in configs] == [2, 2] and [c["step"] for c in configs] == [0, stop_step]
    assert all(c["parallel"] == "fsdp" for c in configs)
    assert all(sorted(c["hosts"]) == ["node1", "node2"] for c in configs)  # one rank on each node, both times
    assert sorted({r["step"] for r in records if r["type"] == "train"}) == list(range(MAX_STEPS))
    assert sorted(p.name for p in (log_dir / "model_final").glob("__*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    sharded = checkpoint.load_model(log_dir / "model_final").state_dict()
    whole = load_checkpoint_file(uninterrupted_run / "model_final.pt")["model"]
    worst = max((sharded[k] - whole[k]).abs().max().item() for k in whole)
    assert sharded.keys() == whole.keys() and worst < 1e-4, f"weights differ by up to {worst:.3g}"
