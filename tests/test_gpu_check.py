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
import core_eval
import fileio

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(gpu_check)

ALL_CHECKS = ["environment", "train", "resume", "hellaswag", "core", "export", "fp16", "throughput", "bigger models"]
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
    in_training = train["core_in_training"]  # --core-every 10: at step 0 and at the end, every stand-in scored
    assert train["core_steps"] == [0, 10] and in_training["step"] == 10 and in_training["count"] == 275
    assert in_training["core"] is not None and in_training["seconds"] is not None
    assert checks["resume"]["max_loss_difference"] == 0.0 and checks["resume"]["steps_compared"] == 5  # bitwise on CPU
    for name in ("hellaswag", "core", "export"):  # the train run finished: each read its final checkpoint
        assert checks[name]["checkpoint"] == "run/model_final.pt" and checks[name]["train_final"] is True
        assert checks[name]["checkpoint_step"] == 10 and "own_checkpoint_seconds" not in checks[name]
    assert checks["hellaswag"]["count"] == 20 and checks["hellaswag"]["examples_per_sec"] > 0
    core = checks["core"]
    assert core["count"] == 275 and core["examples_per_sec"] > 0 and not core["real_data"]
    assert core["core"] is not None and not core["missing"]  # the stand-ins fill every task
    assert core["core"] == in_training["core"]  # the same model and examples, eager on the CPU both times
    compiled = core["compiled"]  # --compile, ignored on the CPU: the same path, eager, the same score
    assert compiled["compiled"] is False and compiled["count"] == 275 and compiled["core"] == core["core"]
    assert compiled["examples_per_sec"] > 0 and core["compiled_vs_eager"] > 0
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
    assert "===== core compiled: core.py" in log and "--compile" in log and "===== own checkpoint" not in log


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


# ---- every check stands alone: the checkpoint an evaluation reads ---------------------------------
def fake_checkpoint(path: Path, step: int) -> Path:
    """A file pick_checkpoint (by its name) and checkpoint.read_step (its "step") read like a real one."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step}, path)
    return path


def test_the_newest_checkpoint_the_train_runs_left_is_picked(tmp_path):
    pick = gpu_check.pick_checkpoint
    assert pick(tmp_path) is None
    fake_checkpoint(tmp_path / "own" / "model_final.pt", 1)  # an evaluation's own: not the train runs'
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".model_00009.pt.x1.tmp").touch()  # a save cut short
    assert pick(tmp_path) is None
    early = fake_checkpoint(tmp_path / "run" / "model_00005.pt", 5)  # a train run cut after step 5
    assert pick(tmp_path) == early
    later = fake_checkpoint(tmp_path / "resumed" / "model_00008.pt", 8)  # its resume, cut after step 8
    fake_checkpoint(tmp_path / "resumed" / "model_00005.pt", 5)
    assert pick(tmp_path) == later
    resumed_final = fake_checkpoint(tmp_path / "resumed" / "model_final.pt", 10)
    assert pick(tmp_path) == resumed_final
    train_final = fake_checkpoint(tmp_path / "run" / "model_final.pt", 10)
    assert pick(tmp_path) == train_final


DATA = Path("/nonexistent/shards")  # every subprocess below is faked: none reads it


def core_result(args: list[str]) -> None:
    """What core.py appends to <--log-dir>/core_results.jsonl: 275 examples in 5 s."""
    log_dir = Path(args[args.index("--log-dir") + 1])
    log_dir.mkdir(parents=True, exist_ok=True)
    record = {"core": 0.1, "core_partial": None, "missing": [], "count": 275, "seconds": 5.0}
    fileio.append_jsonl(log_dir / "core_results.jsonl", record)


def fake_runs(ck: gpu_check.Checker, monkeypatch, own_exit: int = 0, eval_exit: int = 1) -> list:
    """ck.run, faked: each call's (name, args, reserve) is recorded; the own checkpoint's train_gpt2.py
    writes its model_final.pt (with own_exit 0); core.py writes a result; the rest exit eval_exit."""
    calls = []

    def run(name, args, step, reserve=0.0):
        calls.append((name, args, reserve))
        if args[0] == "train_gpt2.py" and own_exit == 0:
            fake_checkpoint(Path(args[args.index("--log-dir") + 1]) / "model_final.pt", 1)
            return gpu_check.Ran(0, "", step.cap)
        if args[0] == "core.py" and eval_exit == 0:
            core_result(args)
        return gpu_check.Ran(own_exit if args[0] == "train_gpt2.py" else eval_exit, "", step.cap)

    monkeypatch.setattr(ck, "run", run)
    return calls


def evaluations(ck: gpu_check.Checker) -> dict:
    sizes = gpu_check.DRY_RUN
    return {
        "hellaswag": lambda: gpu_check.hellaswag_eval(ck, gpu_check.FIXTURE, False, DATA, sizes),
        "core": lambda: gpu_check.core(ck, "", DATA, sizes),
        "export": lambda: gpu_check.export(ck, DATA, sizes),
    }


def checkpoint_read(args: list[str]) -> str:
    return args[args.index("--checkpoint") + 1]


def test_an_evaluation_reads_what_a_cut_train_run_left_else_makes_its_own_checkpoint_once(tmp_path, monkeypatch):
    """The train run cut before its model_final.pt: hellaswag, core and export read its model_00005.pt;
    with nothing at all, the first makes one (one eager step, its needs counted) and the others reuse it."""
    ck = make_checker(tmp_path, budget=600)
    calls = fake_runs(ck, monkeypatch)
    own_needs = gpu_check.STEPS["own checkpoint"].needs
    assert gpu_check.eval_needs(ck, "hellaswag") == gpu_check.STEPS["hellaswag"].needs + own_needs
    for name, evaluate in evaluations(ck).items():
        passed, numbers = evaluate()  # each fails at its (faked) subprocess, after naming its checkpoint
        assert not passed and numbers["exit"] == 1
        assert numbers["checkpoint"] == "own/model_final.pt" and numbers["checkpoint_step"] == 1
        assert numbers["train_final"] is False and ("own_checkpoint_seconds" in numbers) == (name == "hellaswag")
        assert checkpoint_read(calls[-1][1]) == str(ck.work / "own" / "model_final.pt")
    made = [args for name, args, _ in calls if name == "own checkpoint"]
    assert len(made) == 1 and made[0][0] == "train_gpt2.py" and "--no-compile" in made[0]
    assert made[0][made[0].index("--max-steps") + 1] == "1" and made[0][made[0].index("--val-every") + 1] == "0"
    assert gpu_check.eval_needs(ck, "core") == gpu_check.STEPS["core"].needs  # made: nothing more to count

    calls.clear()
    cut = fake_checkpoint(ck.work / "run" / "model_00005.pt", 5)
    for evaluate in evaluations(ck).values():
        passed, numbers = evaluate()
        assert numbers["checkpoint"] == "run/model_00005.pt" and numbers["checkpoint_step"] == 5
        assert numbers["train_final"] is False and checkpoint_read(calls[-1][1]) == str(cut)
    assert [name for name, _, _ in calls] == ["hellaswag", "core", "export"]

    fake_checkpoint(ck.work / "run" / "model_final.pt", 10)
    passed, numbers = evaluations(ck)["export"]()
    assert numbers["checkpoint"] == "run/model_final.pt" and numbers["train_final"] is True


def test_an_evaluation_fails_once_when_no_checkpoint_is_left_and_none_can_be_made(tmp_path, monkeypatch):
    ck = make_checker(tmp_path, budget=600)
    calls = fake_runs(ck, monkeypatch, own_exit=1)
    for evaluate in evaluations(ck).values():
        assert evaluate() == (
            False,
            {"checkpoint": None, "error": "no checkpoint: the train runs left none, and making one failed (exit 1)"},
        )
    assert [name for name, _, _ in calls] == ["own checkpoint"]  # tried once, not once per check


def test_resume_without_the_middle_checkpoint_is_skipped_not_failed(tmp_path, monkeypatch):
    ck = make_checker(tmp_path, budget=600)
    calls = fake_runs(ck, monkeypatch)
    ck.check("resume", lambda: gpu_check.resume(ck, DATA, gpu_check.DRY_RUN), 0)
    assert calls == []
    assert ck.finish() == 0
    (result,) = read_summary(ck.out)["checks"]
    assert result["verdict"] == "SKIPPED"
    assert result["reason"] == "no middle checkpoint: the train run left no model_00005.pt"


def test_the_compiled_core_row_keeps_the_time_of_export_and_the_two_required_throughput_rows(tmp_path, monkeypatch):
    """It starts only with its needs plus export's and the reference and defaults rows' left, with a
    limit that keeps those; without them it is not measured, which is no failure; a crash is one."""
    kept = gpu_check.after_core_compiled(dry_run=False)
    rows = gpu_check.throughput_settings(dry_run=False)[:2]
    assert [r.name for r in rows] == [REFERENCE, DEFAULTS]
    assert kept == gpu_check.STEPS["export"].needs + rows[0].step.needs + rows[1].step.needs
    starts_with = gpu_check.STEPS["core compiled"].needs + kept

    (tmp_path / "roomy").mkdir()
    (tmp_path / "tight").mkdir()
    roomy = make_checker(tmp_path / "roomy", budget=int(starts_with) + 60)
    fake_checkpoint(roomy.work / "run" / "model_final.pt", 10)
    calls = fake_runs(roomy, monkeypatch, eval_exit=0)
    passed, numbers = gpu_check.core(roomy, "", DATA, gpu_check.DRY_RUN)
    assert passed and [(name, reserve) for name, _, reserve in calls] == [("core", 0.0), ("core compiled", kept)]
    assert "--compile" in calls[1][1] and "--compile" not in calls[0][1]
    assert numbers["compiled"]["examples_per_sec"] == numbers["examples_per_sec"] == 55.0
    assert numbers["compiled"]["compiled"] is False and numbers["compiled_vs_eager"] == 1.0  # a dry run: the CPU

    tight = make_checker(tmp_path / "tight", budget=int(starts_with) - 5)
    fake_checkpoint(tight.work / "run" / "model_final.pt", 10)
    calls = fake_runs(tight, monkeypatch, eval_exit=0)
    passed, numbers = gpu_check.core(tight, "", DATA, gpu_check.DRY_RUN)
    assert passed and [name for name, _, _ in calls] == ["core"] and numbers["compiled_vs_eager"] is None
    assert numbers["compiled"] == {"result": "not measured: time budget spent"} and numbers["count"] == 275

    def compiled_exits(code: int) -> dict:
        def run(name, args, step, reserve=0.0):
            if "--compile" in args:
                return gpu_check.Ran(code, "", 45.0)
            core_result(args)
            return gpu_check.Ran(0, "", step.cap)

        monkeypatch.setattr(roomy, "run", run)
        return gpu_check.core(roomy, "", DATA, gpu_check.DRY_RUN)

    passed, numbers = compiled_exits(124)
    assert passed and numbers["compiled"] == {"result": "not measured: killed at its time limit (45 s)"}
    passed, numbers = compiled_exits(1)
    assert not passed and numbers["compiled"] == {"error": "core.py --compile: exit 1"}


def test_the_train_check_runs_core_in_training_and_requires_its_record_at_the_end(tmp_path, monkeypatch):
    ck = make_checker(tmp_path, budget=600)
    calls = fake_runs(ck, monkeypatch, own_exit=0)
    log_dir = ck.work / "run"
    records = [
        *({"type": "train", "step": s, "train_loss": 11.0 - s / 5, "tokens_per_sec": 100.0} for s in range(10)),
        {"type": "val", "step": 0, "val_loss": 11.0},
        {"type": "val", "step": 10, "val_loss": 9.0, "time": 100.0},
        {"type": "hellaswag", "step": 10, "hellaswag_acc_norm": 0.25, "count": 20, "time": 101.0},
        {"type": "sample", "step": 10, "samples": ["Hello"], "time": 109.0},
    ]
    log_dir.mkdir()
    for r in records:
        fileio.append_jsonl(log_dir / "metrics.jsonl", r)
    fake_checkpoint(log_dir / "model_final.pt", 10)
    passed, numbers = gpu_check.train(ck, DATA, gpu_check.DRY_RUN)
    args = calls[0][1]
    assert args[args.index("--core-every") + 1] == "10" and args[args.index("--core-max-per-task") + 1] == "0"
    assert "--no-core-verify" in args
    stand_ins = Path(args[args.index("--core-data") + 1])
    assert all((stand_ins / task.file).is_file() for task in core_eval.TASKS)
    assert not passed and numbers["core_in_training"] is None and numbers["core_steps"] == []  # no CORE record

    core = {"type": "core", "core": 0.02, "core_partial": None, "count": 275, "max_per_task": 0}
    lines = (log_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines.insert(0, json.dumps({**core, "step": 0, "time": 50.0}) + "\n")
    lines.insert(-1, json.dumps({**core, "step": 10, "time": 104.5}) + "\n")  # after HellaSwag's, before the sample
    (log_dir / "metrics.jsonl").write_text("".join(lines))
    passed, numbers = gpu_check.train(ck, DATA, gpu_check.DRY_RUN)
    assert passed and numbers["core_steps"] == [0, 10]
    assert numbers["core_in_training"] == {
        "step": 10,
        "core": 0.02,
        "core_partial": None,
        "count": 275,
        "max_per_task": 0,
        "seconds": 3.5,  # 104.5 - 101.0: since HellaSwag's record, written just before CORE started
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_evaluation_with_no_train_run_makes_a_real_checkpoint_and_passes(data_dir, tmp_path):
    """The one path the dry run does not take, for real: train_gpt2.py accepts the own checkpoint's
    flags, and hellaswag.py scores what it wrote."""
    ck = make_checker(tmp_path, budget=280)
    passed, numbers = gpu_check.hellaswag_eval(ck, gpu_check.FIXTURE, False, data_dir, gpu_check.DRY_RUN)
    assert passed, (ck.out / "gpu_check.log").read_text()[-3000:]
    assert numbers["checkpoint"] == "own/model_final.pt" and numbers["checkpoint_step"] == 1
    assert numbers["train_final"] is False and numbers["count"] == 20 and "own_checkpoint_seconds" in numbers
