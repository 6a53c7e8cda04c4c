"""bench/gpu_check.py, the one-call GPU acceptance check, run end to end on the CPU (--dry-run, the
tiny preset) so it cannot rot between GPU sessions: every check runs, the summary has its fields,
it is rewritten after every check, a run killed mid-way keeps what it finished, and the output folder
fits what the GPU-lending tool hands back (8 files of 16 MiB at most). Its parts (the row verdicts,
the time limits, the log's clipping) are tested alone, without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(gpu_check)

ALL_CHECKS = ["environment", "train", "resume", "hellaswag", "core", "export", "throughput", "bigger models"]
# A CI machine running the other pytest worker beside it is up to twice as slow as the 2.5 minutes
# the dry run takes alone: the default budget (the GPU machine's) would skip its last checks there.
DRY_BUDGET = "900"


def read_summary(out: Path) -> dict | None:
    path = out / "gpu_check.json"
    return json.loads(path.read_text()) if path.exists() else None  # a torn file fails json.loads


@pytest.fixture(scope="module")
def dry_run(data_dir, tmp_path_factory):
    """One dry run for the module's tests, with every state of gpu_check.json seen while it ran."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc = subprocess.Popen(
        [
            "bash",
            str(ROOT / "bench" / "gpu_check.sh"),
            "--dry-run",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--budget",
            DRY_BUDGET,
        ],
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    states, deadline = [], time.monotonic() + 1000
    while proc.poll() is None and time.monotonic() < deadline:
        summary = read_summary(out)
        state = summary and (
            summary["finished"],
            [(c["check"], c["verdict"], len(c.get("rows", []))) for c in summary["checks"]],
        )
        if state and (not states or states[-1] != state):
            states.append(state)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    output = proc.communicate()[0]
    return {"code": proc.returncode, "output": output, "out": out, "summary": read_summary(out), "states": states}


@pytest.mark.slow
@pytest.mark.timeout(1100)
@pytest.mark.heavy
@pytest.mark.xdist_group("gpu_check_dry_run")  # one worker runs the module's dry run once
def test_dry_run_passes_every_check_and_writes_the_summary(dry_run):
    summary = dry_run["summary"]
    assert dry_run["code"] == 0 and summary["passed"] and summary["finished"], dry_run["output"][-6000:]
    checks = {c["check"]: c for c in summary["checks"]}
    assert list(checks) == ALL_CHECKS
    assert all(c["verdict"] == "PASS" for c in checks.values())
    assert checks["environment"]["torch"] and checks["environment"]["device"] == "cpu"
    train = checks["train"]
    assert train["steps"] == 10 and train["first_loss"] - train["last_loss"] >= 0.5 and len(train["val_losses"]) == 3
    assert train["hellaswag_count"] == 20 and train["samples"] == 1 and "model_final.pt" in train["checkpoints"]
    assert checks["resume"]["max_loss_difference"] == 0.0 and checks["resume"]["steps_compared"] == 5  # bitwise on CPU
    assert checks["hellaswag"]["count"] == 20 and checks["hellaswag"]["examples_per_sec"] > 0
    assert checks["core"]["count"] > 0 and checks["core"]["examples_per_sec"] > 0 and not checks["core"]["real_data"]
    assert checks["core"]["core"] is not None and not checks["core"]["missing"]  # the stand-ins fill every task
    assert checks["export"]["max_logit_difference"] < 1e-4
    rows = checks["throughput"]["rows"]
    assert (
        {r["setting"] for r in rows}
        == {s.name for s in gpu_check.throughput_settings(dry_run=True)}
        == {
            "reference settings (compile off, fused AdamW, plain loss)",
            "defaults (compile on)",
            "lever: attention kernels",
            "--parallel ddp vs fsdp (one GPU)",
        }
    )  # the dry run's rows
    assert len(gpu_check.throughput_settings(dry_run=False)) == 8  # the GPU's: every lever
    assert not any("error" in r for r in rows)
    assert all(r["tokens_per_sec"] > 0 for r in rows if gpu_check.measured(r))
    attention = {r["attn_backend"]: r for r in rows if r["setting"] == "lever: attention kernels"}
    assert {k for k, r in attention.items() if gpu_check.measured(r)} >= {"flash", "math"}  # the CPU's kernels
    assert attention["cudnn"]["result"].startswith("not measured: this kernel cannot run these shapes")
    assert [r.get("parallel") for r in rows if r["setting"] == "--parallel ddp vs fsdp (one GPU)"] == ["single", "fsdp"]
    bigger = checks["bigger models"]["rows"]
    assert (
        [r["model"] for r in bigger] == ["tiny"] and bigger[0]["tokens_per_sec"] > 0 and bigger[0]["predicted_gib"] > 0
    )
    log = (dry_run["out"] / "gpu_check.log").read_text()
    assert "===== train: train_gpt2.py" in log and "===== throughput" in log and "===== train: exit 0" in log


@pytest.mark.slow
@pytest.mark.timeout(1100)
@pytest.mark.heavy
@pytest.mark.xdist_group("gpu_check_dry_run")
def test_the_output_folder_is_what_the_gpu_lending_tool_can_hand_back(dry_run):
    """At most 8 files of 16 MiB: the summary and the log only; checkpoints and exports went to a
    temp work folder outside it, deleted at the end."""
    out = dry_run["out"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["gpu_check.json", "gpu_check.log"]
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)
    work = Path(dry_run["summary"]["config"]["work_dir"])
    assert out.resolve() not in work.parents and not work.exists()


@pytest.mark.slow
@pytest.mark.timeout(1100)
@pytest.mark.heavy
@pytest.mark.xdist_group("gpu_check_dry_run")
def test_the_summary_is_rewritten_after_every_check_and_every_throughput_row(dry_run):
    """Every state of gpu_check.json seen while it ran was whole JSON (read_summary would have raised
    on a torn one), unfinished until the end, and each held the checks finished before it."""
    states = dry_run["states"]
    assert [finished for finished, _ in states] == [False] * (len(states) - 1) + [True]
    finished_checks = [[name for name, verdict, _ in checks if verdict != "RUNNING"] for _, checks in states]
    assert all(done == ALL_CHECKS[: len(done)] for done in finished_checks)
    assert {len(done) for done in finished_checks} == set(range(len(ALL_CHECKS) + 1))  # one write per check at least
    running = [checks[-1] for _, checks in states if checks and checks[-1][1] == "RUNNING"]
    assert list(dict.fromkeys(name for name, _, _ in running)) == ALL_CHECKS  # each saved as it started
    assert {rows for name, _, rows in running if name == "throughput"} >= {0, 1, 2, 6}  # and after each setting


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_dry_run_killed_mid_way_keeps_every_check_it_finished_and_leaves_no_orphan(data_dir, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--dry-run",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--work-dir",
            str(work),
            "--budget",
            DRY_BUDGET,
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def running_in_work() -> list[str]:  # the train run gpu_check had started, if it outlived it
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(work) in cmdline.read_bytes().decode(errors="replace") and cmdline.parent.name != str(proc.pid):
                    found.append(cmdline.parent.name)
            except OSError:
                continue  # ended while we looked
        return found

    try:  # killed while its train check's trainer runs (the check done before it must survive)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            summary = read_summary(out)
            if summary and summary["checks"][-1] == {"check": "train", "verdict": "RUNNING"} and running_in_work():
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # as the lending tool does at its limit: no handler runs
    finally:
        proc.wait()
    summary = read_summary(out)
    assert summary["finished"] is False and summary["passed"] is False
    done = [c for c in summary["checks"] if c["verdict"] != "RUNNING"]
    assert [c["check"] for c in done] == ["environment"] and done[0]["verdict"] == "PASS" and done[0]["torch"]
    assert summary["checks"][1:] == [{"check": "train", "verdict": "RUNNING"}]  # the one it was in
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.log"}

    deadline = time.monotonic() + 10
    while running_in_work() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_in_work() == []


# ---- the parts, without a GPU ---------------------------------------------------------------------
REFERENCE, DEFAULTS = "reference settings (compile off, fused AdamW, plain loss)", "defaults (compile on)"
MEASURED = json.dumps(
    {
        "micro_batch_size": 64,
        "tokens_per_sec": 650_000.0,
        "mfu": 0.41,
        "step_ms": 403.0,
        "peak_memory_gb": 60.2,
        "attention": "auto->flash",
        "compile": True,
    }
)
OOM = json.dumps({"micro_batch_size": 128, "error": "out of memory: lower --micro-batch-size or use --loss-chunk-rows"})


def test_a_lever_out_of_memory_or_out_of_time_is_not_measured_and_not_a_failure():
    lever = "lever: micro-batch 32 / 128"
    oom = gpu_check.classify_bench(lever, 3, f"  step 1/8 (warm-up): 40.1 s\n{MEASURED}\n{OOM}\n", 240)
    assert gpu_check.measured(oom[0]) and oom[0]["tokens_per_sec"] == 650_000.0
    assert oom[1]["result"].startswith("not measured: out of memory") and oom[1]["micro_batch_size"] == 128
    killed = gpu_check.classify_bench(lever, 124, MEASURED + "\n[killed after 240 s: its limit was 240 s]\n", 240)
    assert gpu_check.measured(killed[0]) and killed[1] == {
        "setting": lever,
        "result": "not measured: killed at its time limit (240 s)",
    }
    required = gpu_check.classify_bench(REFERENCE, 0, MEASURED, 90) + gpu_check.classify_bench(
        DEFAULTS, 0, MEASURED, 150
    )
    assert gpu_check.throughput_passed(required + oom + killed)
    skipped = [{"setting": "--optimizer muon", "result": "not measured: time budget spent"}]
    assert gpu_check.throughput_passed(required + skipped)


def test_the_reference_and_defaults_rows_are_required_and_a_crash_is_an_error():
    reference = gpu_check.classify_bench(REFERENCE, 0, MEASURED, 90)
    defaults_oom = gpu_check.classify_bench(DEFAULTS, 3, OOM, 150)
    defaults_killed = gpu_check.classify_bench(DEFAULTS, 124, "  step 1/8 (warm-up): 150.0 s\n", 150)
    assert defaults_oom[0]["result"].startswith("not measured: out of memory")
    assert not gpu_check.throughput_passed(reference + defaults_oom)
    assert not gpu_check.throughput_passed(reference + defaults_killed)
    assert not gpu_check.throughput_passed(gpu_check.classify_bench(DEFAULTS, 0, MEASURED, 150))  # no reference
    crash = gpu_check.classify_bench(
        "--optimizer muon", 1, "Traceback (most recent call last):\nKeyError: 'muon'\n", 150
    )
    assert crash == [{"setting": "--optimizer muon", "error": "exit 1: KeyError: 'muon'"}]
    assert not gpu_check.throughput_passed(reference + gpu_check.classify_bench(DEFAULTS, 0, MEASURED, 150) + crash)
    bad_kernel = json.dumps(
        {"attn_backend": "cudnn", "error": "RuntimeError: No available kernel. Aborting execution."}
    )
    rows = gpu_check.classify_bench("lever: attention kernels", 2, f"{MEASURED}\n{bad_kernel}\n", 300)
    assert (
        rows[1]["result"] == "not measured: this kernel cannot run these shapes: RuntimeError: No available kernel. "
        "Aborting execution."
    )
    assert gpu_check.classify_bench("--optimizer muon", 2, bad_kernel, 150)[0]["error"].startswith("RuntimeError")


def make_checker(tmp_path: Path, budget: int) -> gpu_check.Checker:
    cfg = gpu_check.CheckConfig(out=str(tmp_path / "out"), budget=budget, dry_run=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "work").mkdir()
    return gpu_check.Checker(cfg, tmp_path / "out", tmp_path / "work", {"budget": budget}, started=time.monotonic())


def test_a_subprocess_never_runs_past_the_budget_and_a_check_without_time_is_skipped(tmp_path):
    ck = make_checker(tmp_path, budget=3)
    before = read_summary(ck.out)  # written before anything ran
    assert before["finished"] is False and before["passed"] is False and before["checks"] == []
    start = time.monotonic()
    sleeper = ck.run(
        "sleeper", ["-c", "import time; print('started', flush=True); time.sleep(60)"], gpu_check.Step(100, 0)
    )
    assert (
        sleeper.code == 124 and sleeper.timeout <= 3 and time.monotonic() - start < 10 and "started" in sleeper.output
    )
    late = ck.run("late", ["-c", "pass"], gpu_check.Step(100, 0))
    assert late.code == 124 and late.output == "[not started: time budget spent]"
    ck.check("needs a minute", lambda: (True, {}), needs=60)
    assert ck.finish() == 0
    summary = read_summary(ck.out)
    assert summary["finished"] and summary["passed"]
    assert summary["checks"] == [
        {
            "check": "needs a minute",
            "verdict": "SKIPPED",
            "reason": "time budget spent",
            "needs_s": 60,
            "left_s": summary["checks"][0]["left_s"],
        }
    ]
    assert "[killed after" in (ck.out / "gpu_check.log").read_text()


def test_the_log_keeps_each_output_s_start_and_end_within_its_bounds(tmp_path):
    ck = make_checker(tmp_path, budget=60)
    chatty = "import sys; sys.stdout.write('first line\\n' + 'x' * 1_000_000 + '\\nlast line\\n')"
    ran = ck.run("chatty", ["-c", chatty], gpu_check.Step(30, 0))
    assert ran.code == 0 and ran.output.startswith("first line") and ran.output.rstrip().endswith("last line")
    size = len("first line\n") + 1_000_000 + len("\nlast line\n")
    cut = size - gpu_check.LOG_HEAD_BYTES - gpu_check.LOG_TAIL_BYTES
    assert f"[... {cut} bytes cut ...]" in ran.output
    ck.log.close()
    log = (ck.out / "gpu_check.log").read_bytes()
    assert len(log) < gpu_check.LOG_HEAD_BYTES + gpu_check.LOG_TAIL_BYTES + 1000 and b"last line" in log
    assert (ck.work / "output" / "01.stdout").stat().st_size == size  # the whole output stays in the work folder
    bounded = gpu_check.BoundedLog(tmp_path / "bounded.log", limit=1000)
    for _ in range(50):
        bounded.write("y" * 100 + "\n")
    bounded.close()
    text = (tmp_path / "bounded.log").read_text()
    assert len(text) < 1100 and text.endswith("[gpu_check.log reached 1000 bytes: nothing more is logged]\n")


def test_a_work_folder_inside_the_output_folder_is_refused(tmp_path):
    code = cli.run_main(
        gpu_check.main, ["--dry-run", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "out" / "work")]
    )
    assert code == 2 and not (tmp_path / "out" / "work").exists()
