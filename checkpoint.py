"""Checkpoints: the one loader every script uses (the trainer's resume, hellaswag.py, sample.py,
export_hf.py), the trainer's writer, and Hugging Face GPT-2 loading (--init-from, hellaswag.py --hf).

    uv run python -c "import checkpoint; print(checkpoint.load_model('log/model_final.pt').config)"

A checkpoint is one file, `<log dir>/model_{step:05d}.pt` or `model_final.pt`: a dict of tensors and
plain values written by torch.save through a temp file and a rename (a kill never leaves a torn
file), loaded with `weights_only=True` (it cannot run code) and `mmap=True` (tensors are read from
the page cache as they are copied where they go, never held twice in memory). What the trainer puts
in it is listed in train_gpt2.checkpoint_state; every file that is not such a dict (a torn copy, a
text file renamed .pt, another program's pickle) is refused with one line.
"""

from __future__ import annotations

import math
import re
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

import fileio
from model import GPT, GPTConfig, gpt_config_from_hf, load_hf_state_dict

PATTERN = re.compile(r"model_(\d{5,})\.pt$")
FINAL = "model_final.pt"
TMP_PREFIX = ".model_"  # atomic_path's temp names: .model_00042.pt.<random>.tmp
MODEL_KEYS = ("model", "model_config")
TRAINING_KEYS = ("model", "model_config", "optimizer", "step", "loader", "config")


def load_file(path: str | Path, map_location="cpu", required: tuple[str, ...] = MODEL_KEYS) -> dict:
    """torch.load one checkpoint of ours, memory-mapped; every malformed file is a one-line ValueError
    (FileNotFoundError when there is none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: pass the path of a model_*.pt file in your log dir")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, KeyError, UnpicklingError, ... on bad files
        raise ValueError(f"checkpoint {path} is corrupt, truncated or not a checkpoint of this repo "
                         f"({type(e).__name__}): use another checkpoint") from None
    missing = [key for key in required if key not in ckpt] if isinstance(ckpt, dict) else list(required)
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this repo (no {', '.join(repr(k) for k in missing)}): "
                         "use a model_*.pt file written by train_gpt2.py")
    return ckpt


def load_model(path: str | Path) -> GPT:
    """The GPT of a checkpoint, in eval mode, on the CPU: its weights copied from the memory-mapped
    file (page cache, not a second copy in the process). (Building it on the meta device instead
    would skip the random init, but initialising meta tensors imports torch._dynamo: 4 s.)"""
    ckpt = load_file(path)
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise ValueError(f"{path}: weights do not fit its model_config ({detail})") from None
    return model.eval()


def read_step(path: str | Path) -> int | None:
    """The optimizer steps a checkpoint had done (memory-mapped: the tensors are not read)."""
    step = load_file(path, required=()).get("step")
    return step if isinstance(step, int) else None


def paths(log_dir: str | Path) -> list[tuple[float, Path]]:
    """(step, path) of every model_NNNNN.pt and model_final.pt in `log_dir`, newest first (the final
    one counts as newest; its real step is inside)."""
    found = []
    for path in Path(log_dir).glob("model_*.pt"):
        match = PATTERN.search(path.name)
        if match:
            found.append((int(match.group(1)), 0, path))
        elif path.name == FINAL:
            found.append((math.inf, 1, path))
    return [(step, path) for step, _, path in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def load_latest(log_dir: str | Path, warn: bool = True) -> dict | None:
    """The newest checkpoint in `log_dir` that loads, with its "path"; a corrupt one is skipped with
    a warning (a disk that filled up, a copy cut short), an older one used instead."""
    for _, path in paths(log_dir):
        try:
            ckpt = load_file(path, required=TRAINING_KEYS)
        except ValueError as e:
            if warn:
                warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
            continue
        ckpt["path"] = str(path)
        return ckpt
    return None


def save(state: dict, path: str | Path, keep: int | None) -> None:
    """Write `state` atomically to `path`; then keep only the newest `keep` step checkpoints
    (model_final.pt is never pruned; keep=None prunes nothing)."""
    path = Path(path)
    with fileio.atomic_path(path, tmp_prefix=f".{path.name}.") as tmp, open(tmp, "wb") as f:
        try:
            # Through a Python file object, so that a full disk is an OSError(ENOSPC / EFBIG) from
            # f.write; torch's zip writer then reports it as "RuntimeError: [enforce fail at
            # inline_container.cc] unexpected pos 576 vs 534" (measured), the OSError as its context.
            torch.save(state, f)
        except RuntimeError as e:
            cause = _os_error_in(e)
            if cause is None:
                raise
            raise cause from None
    if keep is not None:
        steps = [(s, p) for s, p in paths(path.parent) if s != math.inf]
        for _, old in steps[keep:]:
            old.unlink(missing_ok=True)


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e` (its cause / context chain), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


# ---- Hugging Face ---------------------------------------------------------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hugging Face Hub at all? (A machine without network fails
    here in milliseconds; transformers would retry for ~30 s before saying so.)"""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def load_hf_model(name: str, flag: str = "--hf") -> GPT:
    """A transformers GPT-2 (a Hub name such as gpt2-medium, or a folder such as an export_hf.py
    output) as our GPT, in eval mode. Looks in the local cache / folder first; goes to the network only
    when that fails and the Hub is reachable; fails at once, in one line, when it is not."""
    from huggingface_hub import constants
    from transformers import AutoConfig, GPT2LMHeadModel

    def fail(reason: str) -> ValueError:
        return ValueError(f"{flag} {name}: {reason}; a Hub name needs the network once (or a Hugging Face cache "
                          "that has it, under HF_HOME); offline, pass a local folder such as an export_hf.py output")

    folder, offline = Path(name).is_dir(), constants.HF_HUB_OFFLINE
    for local in (True, False):  # the cache (or the folder) first; the network only if that fails
        if not local:
            if folder:
                raise fail("the folder holds no loadable GPT-2 (config.json + weights)")
            if offline:
                raise fail("not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
            if not _hub_reachable():
                raise fail(f"not in the local Hugging Face cache, and the Hub ({constants.ENDPOINT}) is not reachable")
        try:
            hf_config = AutoConfig.from_pretrained(name, local_files_only=local)
            if hf_config.model_type != "gpt2":
                raise ValueError(f"{flag} {name} is a {hf_config.model_type!r} model: only GPT-2 models load into this repo's GPT")
            hf = GPT2LMHeadModel.from_pretrained(name, local_files_only=local)
            break
        except OSError as e:
            if not local:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise fail(f"could not load it ({first})") from None
    return load_hf_state_dict(GPT(gpt_config_from_hf(hf.config)), hf.state_dict()).eval()
