"""bench/gpu_check.py, the one-call GPU acceptance check, run end to end on the CPU (--dry-run, the
tiny preset) so it cannot rot between GPU sessions: every check runs and the summary has its fields."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_passes_every_check_and_writes_the_summary(data_dir, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--data-dir", str(data_dir),
                             "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=580,
                            env={**os.environ, "PYTHON": sys.executable})
    summary = json.loads((out / "gpu_check.json").read_text())
    assert result.returncode == 0 and summary["passed"], result.stdout[-3000:] + result.stderr[-3000:]
    checks = {c["check"]: c for c in summary["checks"]}
    assert list(checks) == ["environment", "train", "resume", "hellaswag", "export", "throughput", "bigger models"]
    assert all(c["verdict"] == "PASS" for c in checks.values())
    assert checks["environment"]["torch"] and checks["environment"]["device"] == "cpu"
    train = checks["train"]
    assert train["steps"] == 10 and train["first_loss"] - train["last_loss"] >= 0.5 and len(train["val_losses"]) == 3
    assert train["hellaswag_count"] == 20 and train["samples"] == 1 and "model_final.pt" in train["checkpoints"]
    assert checks["resume"]["max_loss_difference"] == 0.0 and checks["resume"]["steps_compared"] == 5  # bitwise on CPU
    assert checks["hellaswag"]["count"] == 20 and checks["hellaswag"]["examples_per_sec"] > 0
    assert checks["export"]["max_logit_difference"] < 1e-4
    rows = checks["throughput"]["rows"]
    settings = {r["setting"] for r in rows}
    assert settings == {"reference settings (compile off, fused AdamW, plain loss)", "defaults (compile on)",
                        "lever: attention kernels", "--parallel ddp vs fsdp (one GPU)"}  # the dry run's rows
    assert len(gpu_check.throughput_settings(dry_run=False)) == 8  # the GPU's: every lever
    assert all(r["tokens_per_sec"] > 0 for r in rows if "error" not in r)
    assert {r.get("attn_backend") for r in rows if "error" not in r and r["setting"] == "lever: attention kernels"} \
        >= {"flash", "math"}  # the CPU's kernels; cudnn / efficient rows say why they cannot run
    assert [r.get("parallel") for r in rows if r["setting"] == "--parallel ddp vs fsdp (one GPU)"] == ["single", "fsdp"]
    bigger = checks["bigger models"]["rows"]
    assert [r["model"] for r in bigger] == ["tiny"] and bigger[0]["tokens_per_sec"] > 0 and bigger[0]["predicted_gib"] > 0
    log = (out / "gpu_check.log").read_text()
    assert "===== train: train_gpt2.py" in log and "===== throughput" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]  # the work dir is removed
