"""Checkpoints: the one loader every script uses (the trainer's resume, hellaswag.py, sample.py,
export_hf.py), the trainer's writer, and Hugging Face GPT-2 loading (--init-from, hellaswag.py --hf).

    uv run python -c "import checkpoint; print(checkpoint.load_model('log/model_final.pt').config)"

A checkpoint comes in one of two kinds, and every loader here takes both:

- one file, `<log dir>/model_{step:05d}.pt` or `model_final.pt` (one process, DDP): a dict of tensors
  and plain values written by torch.save through a temp file and a rename (a kill never leaves a
  torn file), loaded with `weights_only=True` (it cannot run code) and `mmap=True` (tensors are read
  from the page cache as they are copied where they go, never held twice in memory);
- a folder, `<log dir>/model_{step:05d}/` or `model_final/` (`--parallel fsdp`): a
  torch.distributed.checkpoint (DCP) checkpoint, each rank's shards of the weights and optimizer
  state in its own `__<rank>_0.distcp` file, the index in `.metadata`, and the rest (step, loader,
  RNG, config) in `train_state.pt`. Written into `.model_NNNNN.sharded.tmp/` and renamed when every
  rank is done. DCP reshards on load: any world size, either kind of model (plain, DDP, FSDP2).

What the trainer puts in one is listed in train_gpt2.save_checkpoint (a format version, the model's
shape, the config, the step, then one entry per part of train_gpt2.stateful_parts); every file or folder that is not
such a checkpoint (a torn copy, a text file renamed .pt, a folder missing a rank's shard) is refused
with one line.
"""

from __future__ import annotations

import math
import re
import socket
import warnings
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch

import cli
import fileio
import runtime
from model import GPT, GPTConfig, gpt_config_from_hf, load_hf_state_dict

STEP_NAME = re.compile(r"model_(\d{5,})$")  # a checkpoint's name without .pt
FILE_SUFFIX = ".pt"
FINAL_NAME = "model_final"
FINAL = FINAL_NAME + FILE_SUFFIX
TMP_PREFIX = ".model_"  # temp names: .model_00042.pt.<random>.tmp, .model_00042.sharded.tmp/
STATE_FILE = "train_state.pt"  # in a sharded folder: everything but the weights and optimizer tensors
TENSOR_KEYS = ("model", "optimizer")  # in a sharded checkpoint: in the DCP shards
MODEL_KEYS = ("model", "model_config")
TRAINING_KEYS = ("model", "model_config", "optimizer", "step", "config")  # what resume reads before deciding
# What a training checkpoint holds, by version: bump it when that changes. The trainer resumes only its
# own version (train_gpt2.resume_problem says so in one line); the weights' layout has not changed
# since the first version, so load_model reads any.
FORMAT_VERSION = 1
# Parameter-group entries that say how THIS run computes, not where training stands: kept from the
# optimizer the run built when a checkpoint is loaded. lr_scale follows the flags (--muon-lr); the
# kernel choices follow the device (fused AdamW on CUDA, foreach on CPU).
RUN_GROUP_SETTINGS = ("lr_scale", "fused", "foreach", "capturable", "differentiable")


def load_file(path: str | Path, map_location="cpu", required: tuple[str, ...] = MODEL_KEYS) -> dict:
    """torch.load one checkpoint of ours, memory-mapped; every malformed one is a one-line ValueError
    (FileNotFoundError when there is none). A sharded folder gives its train_state.pt with
    "sharded": True (its weights stay on disk until load_model / load_training_state)."""
    path = Path(path)
    if not path.exists() and path.suffix == FILE_SUFFIX and path.with_suffix("").is_dir():
        path = path.with_suffix("")  # log/model_final.pt of a --parallel fsdp run: the folder log/model_final
    if path.is_dir():
        found = [] if (path / ".metadata").exists() else paths(path)
        if found:  # a run's folder (--checkpoint log), not a sharded checkpoint: name the newest in it
            raise cli.UserError(
                f"{path} is a log dir, not a checkpoint: pass one of its checkpoints, e.g. the newest, {found[0][1]}"
            )
        return _load_sharded_state(path, required)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: pass a model_*.pt file or model_* folder of your log dir"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, KeyError, UnpicklingError, ... on bad files
        raise cli.UserError(
            f"checkpoint {path} is corrupt, truncated or not a checkpoint of this repo "
            f"({type(e).__name__}): use another checkpoint"
        ) from None
    missing = [key for key in required if key not in ckpt] if isinstance(ckpt, dict) else list(required)
    if missing:
        raise cli.UserError(
            f"{path} is not a checkpoint of this repo (no {', '.join(repr(k) for k in missing)}): "
            "use a model_*.pt file written by train_gpt2.py"
        )
    return ckpt


def _load_sharded_state(path: Path, required: tuple[str, ...]) -> dict:
    """A sharded folder's train_state.pt, after checking that every shard file its .metadata names
    is there in full (a folder copied without one rank's file is refused, not half-loaded)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - missing or torn .metadata
        raise cli.UserError(
            f"checkpoint folder {path} has no readable .metadata ({type(e).__name__}): it is not a "
            "complete sharded checkpoint; use another checkpoint"
        ) from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = (path / name).stat().st_size if (path / name).is_file() else None
        if have is None or have < size:
            what = "is missing" if have is None else f"is cut short ({have:,} of {size:,} bytes)"
            raise cli.UserError(f"checkpoint folder {path} is incomplete: shard {name} {what}; use another checkpoint")
    saved = {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
    state = load_file(path / STATE_FILE, required=tuple(k for k in required if k not in TENSOR_KEYS))
    missing = [key for key in required if key in TENSOR_KEYS and key not in saved]
    if missing:
        raise cli.UserError(
            f"checkpoint folder {path} holds no {', '.join(repr(k) for k in missing)}: use a model_* "
            "folder written by train_gpt2.py"
        )
    return {**state, "sharded": True, "path": str(path)}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The GPT of a checkpoint (file or sharded folder, any world size), in eval mode, on `device`:
    built there, its weights copied from the memory-mapped file or read from the shards straight into
    the model's tensors (one copy of the weights in memory either way, none on the host for a GPU).
    (Building it on the meta device instead would skip the random init, but initialising meta
    tensors imports torch._dynamo: 4 s.)"""
    ckpt = load_file(path)
    try:
        with torch.device(device):
            model = GPT(GPTConfig(**ckpt["model_config"]))
        if ckpt.get("sharded"):
            import torch.distributed.checkpoint as dcp

            weights = _untied(model, model.state_dict())
            with (
                warnings.catch_warnings()
            ):  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({"model": weights}, checkpoint_id=ckpt["path"], no_dist=True)  # every process reads it all
        else:
            model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise cli.UserError(f"{path}: weights do not fit its model_config ({detail})") from None
    return model.eval()


class Evaluated(NamedTuple):
    """The model an evaluation script scores, and where its scores are filed."""

    model: GPT
    checkpoint: str | None  # our checkpoint's path; None for a Hugging Face model
    step: int | None  # the optimizer steps it had done (None: a Hugging Face model)
    results_dir: Path  # its run's folder, where plot.py reads the scores


def load_evaluated(path: str, hf: str, log_dir: str, device: torch.device) -> Evaluated:
    """What hellaswag.py and core.py score: a Hugging Face GPT-2 (`hf`, a name or folder) or our
    checkpoint (`path`, default log/model_final.pt), and where its scores go (`results_dir`)."""
    where = results_dir(path, hf, log_dir)
    if hf:
        return Evaluated(load_hf_model(hf, device=device), None, None, where)
    path = path or cli.DEFAULT_CHECKPOINT
    return Evaluated(load_model(path, device), path, read_step(path), where)


def results_dir(path: str, hf: str, log_dir: str) -> Path:
    """Where an evaluation of checkpoint `path` (or Hugging Face model `hf`) is filed: --log-dir, else
    the checkpoint's folder (its run's log dir, so log_fast/model_final.pt is filed in log_fast/, where
    plot.py --log-dir log_fast reads it), else log/ for a Hugging Face model."""
    if log_dir:
        return Path(log_dir)
    return Path(cli.DEFAULT_LOG_DIR) if hf else Path(path or cli.DEFAULT_CHECKPOINT).parent


def read_step(path: str | Path) -> int | None:
    """The optimizer steps a checkpoint had done (memory-mapped: the tensors are not read)."""
    step = load_file(path, required=()).get("step")
    return step if isinstance(step, int) else None


def paths(log_dir: str | Path) -> list[tuple[float, Path]]:
    """(step, path) of every checkpoint in `log_dir` (model_NNNNN.pt files, model_NNNNN/ folders and
    the final one of either kind), newest first (the final one counts as newest; its real step is inside)."""
    found = []
    for path in Path(log_dir).glob("model_*"):
        if path.is_file() and path.name.endswith(FILE_SUFFIX):
            name = path.name[: -len(FILE_SUFFIX)]
        elif path.is_dir():
            name = path.name
        else:
            continue
        match = STEP_NAME.fullmatch(name)
        if match:
            found.append((int(match.group(1)), 0, path))
        elif name == FINAL_NAME:
            found.append((math.inf, 1, path))
    return [(step, path) for step, _, path in sorted(found, key=lambda t: (t[0], t[1], t[2].name), reverse=True)]


def is_final(path: str | Path) -> bool:
    return Path(path).name in (FINAL, FINAL_NAME)


def size_bytes(path: str | Path) -> int:
    """A checkpoint's size on disk (a sharded folder: all its files)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def load_latest(log_dir: str | Path, warn: bool = True) -> dict | None:
    """The newest checkpoint in `log_dir` that loads, with its "path"; a corrupt or incomplete one is
    skipped with a warning (a disk that filled up, a copy cut short), an older one used instead."""
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
    with fileio.atomic_path(path, tmp_prefix=f".{path.name}.") as tmp:
        _torch_save(state, tmp)
    prune(path.parent, keep)


def _torch_save(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
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


def prune(log_dir: Path, keep: int | None) -> None:
    """Keep only the newest `keep` step checkpoints, of either kind (the final one is never pruned)."""
    if keep is None:
        return
    steps = [(s, p) for s, p in paths(log_dir) if s != math.inf]
    for _, old in steps[keep:]:
        fileio.remove(old)


# ---- sharded (DCP) checkpoints --------------------------------------------------------------------
def optimizer_parts(optimizer) -> dict:
    """{name: torch optimizer}: muon.CombinedOptimizer's parts, or the one AdamW."""
    return dict(getattr(optimizer, "optimizers", {"adamw": optimizer}))


def _untied(model: torch.nn.Module, weights: dict) -> dict:
    """`weights` without the second name of a tied parameter (lm_head.weight = wte.weight): stored once."""
    return {name: t for name, t in weights.items() if name not in _aliases(model)}


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """{second name: first name} of parameters registered under two names."""
    first, aliases = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _sharded_tensors(model: torch.nn.Module, optimizer) -> dict:
    """The DCP state: this rank's shards (DTensors) under FSDP2, whole tensors otherwise."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        "model": _untied(model, get_model_state_dict(model)),
        "optimizer": {name: get_optimizer_state_dict(model, opt) for name, opt in optimizer_parts(optimizer).items()},
    }


def save_sharded(model: torch.nn.Module, optimizer, state: dict, path: Path, keep: int | None, is_main: bool) -> Path:
    """Called on every rank: write the DCP folder `path` (each rank its shards; the main rank `state`
    as train_state.pt), atomically: into a temp folder, renamed once every rank's data is on disk.
    OSError (the same on every rank) when the shards could not be written."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    tmp = path.with_name(f".{path.name}.sharded.tmp")
    cleared = [None]
    if is_main:
        try:
            fileio.remove(tmp)  # a previous save of this step that was cut short
        except OSError as e:
            cleared = [e]
    # Every rank waits for the main rank here and learns whether it could clear the way: a failure
    # that skipped this collective on one rank would leave the others in it (NCCL: until the timeout).
    dist.broadcast_object_list(cleared, src=0)
    if cleared[0] is not None:
        raise cleared[0]
    try:
        dcp.save(_sharded_tensors(model, optimizer), storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    except CheckpointException as e:  # raised on every rank, with every rank's failure
        failures = list(getattr(e, "failures", {}).values())
        cause = next((c for c in map(_os_error_in, failures) if c is not None), None)
        raise cause or OSError(f"sharded save failed on ranks {sorted(getattr(e, 'failures', {}))}") from None
    # dcp.save returns once every rank's shards are written and the main rank's .metadata too.
    if is_main:
        _torch_save(state, tmp / STATE_FILE)
        fileio.fsync_file(tmp / STATE_FILE)  # on disk before the rename publishes the folder
        fileio.remove(path)  # model_final/ written again (a resumed final evaluation)
        tmp.rename(path)
        fileio.fsync_dir(path.parent)
        prune(path.parent, keep)
    return path


def load_training_state(ckpt: dict, model: torch.nn.Module, optimizer) -> None:
    """Load a checkpoint of either kind (saved at any world size, by any strategy) into `model` and
    `optimizer` as this run holds them (plain, DDP's module, or sharded by FSDP2). The parameter
    groups' settings in RUN_GROUP_SETTINGS stay this run's: torch's load_state_dict would silently
    bring back the saved ones (a changed --muon-lr ignored; a CPU-written checkpoint resumed on a GPU
    stepping without fused AdamW)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    parts = optimizer_parts(optimizer)
    ours = [
        {key: group[key] for key in RUN_GROUP_SETTINGS if key in group}
        for opt in parts.values()
        for group in opt.param_groups
    ]
    if ckpt.get("sharded"):
        tensors = _sharded_tensors(model, optimizer)
        dcp.load(tensors, checkpoint_id=ckpt["path"])  # each rank reads the pieces of its shards
        aliases = _aliases(model)
        weights = {**tensors["model"], **{alias: tensors["model"][name] for alias, name in aliases.items()}}
        set_model_state_dict(model, weights)
        for name, opt in parts.items():
            set_optimizer_state_dict(model, opt, tensors["optimizer"][name])
    else:  # the parts match: train_gpt2.resume_problem refused another --optimizer
        saved = ckpt["optimizer"] if hasattr(optimizer, "optimizers") else {"adamw": ckpt["optimizer"]}
        if any(hasattr(p, "device_mesh") for p in model.parameters()):  # sharded (FSDP2): each rank takes its part
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, ckpt["model"], options=full)
            for name, opt in parts.items():
                set_optimizer_state_dict(model, opt, _by_name(model, opt, saved[name]), options=full)
        else:  # whole tensors into whole tensors
            model.load_state_dict(ckpt["model"])
            for name, opt in parts.items():
                opt.load_state_dict(saved[name])
    groups = [group for opt in parts.values() for group in opt.param_groups]
    for group, settings in zip(groups, ours):
        group.update(settings)


def _by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """torch's optimizer state_dict (parameters numbered in param_groups order) keyed by parameter
    names instead, the form set_optimizer_state_dict takes. The numbering is the same in the saving
    and the loading run: both build their groups in make_optimizer's order."""
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(group["params"]) for group in saved["param_groups"]):
        raise cli.UserError(
            "the checkpoint's optimizer holds other parameters than this model: resume with its --model"
        )
    return {
        "state": {order[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in saved["param_groups"]],
    }


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e` (its cause / context chain), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


# ---- a training run's checkpoint: saving it, and resuming from it ----------------------------------
# The settings that decide the weights a run ends with: the same command with another value of one of
# them, given a finished run's folder, did not train (`finished`).
RUN_SETTINGS = (
    *("model", "init_from", "shuffle", "tokens_per_step", "seq_len", "max_steps", "warmup_steps", "max_lr"),
    *("min_lr_frac", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "schedule", "decay_frac"),
    *("optimizer", "muon_lr", "muon_momentum", "recipe", "seed", "demo"),
)
# Changed on resume, these make it another run (another batch, order or stream): refused without
# --allow-config-change. And the flags that say how to resume, never compared.
RESUME_REFUSED = ("tokens_per_step", "seq_len", "seed", "shuffle")
RESUME_FLAGS = ("resume", "allow_config_change")


class CheckpointNotWritten(cli.RunFailed):
    """A checkpoint could not be written (full disk, quota, permissions): every rank stops."""


class Resumed(NamedTuple):
    """Where a run starts: its step, whether that step's evaluations were logged before the
    checkpoint was saved, the checkpoint (None: a fresh start) and the settings changed since it."""

    step: int
    evals_done: bool
    path: str | None
    changes: list[str]


class Finished(NamedTuple):
    """--resume auto found the run over: what to tell the user, and the exit code (2 when the command
    asked for other settings than the finished run's, so it did not train)."""

    message: str
    code: int


def training_path(stem: Path, sharded: bool) -> Path:
    """Where a training checkpoint named `stem` (log/model_00042) goes: log/model_00042.pt, or the
    folder log/model_00042/ when sharded."""
    return stem if sharded else stem.with_name(stem.name + FILE_SUFFIX)


def save_training_state(
    model: torch.nn.Module, optimizer, state: dict, stem: Path, keep: int | None, *, sharded: bool, is_main: bool
) -> Path:
    """The mirror of load_training_state, called on every rank: the weights, the optimizer state and
    `state` (step, loader, RNG, ...) as one file from the main rank (the others hold the same weights),
    or sharded (FSDP2) as a DCP folder of every rank's shards. Every rank learns whether any rank's
    write failed and raises CheckpointNotWritten with one line (the previous checkpoints untouched)."""
    path, failure = training_path(stem, sharded), None
    try:
        if sharded:
            save_sharded(model, optimizer, state, path, keep, is_main)
        elif is_main:
            save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}, path, keep)
    except OSError as e:  # the temp file is gone, the previous checkpoints are untouched
        failure = e
    problem = runtime.first_problem(failure_message(path, failure) if failure else None, name_rank=False)
    if problem:
        raise CheckpointNotWritten(problem)
    return path


def failure_message(path: Path, e: OSError) -> str:
    """A checkpoint that could not be written, in one line: what was kept and how to go on."""
    newest = paths(path.parent)
    kept = (
        f"{newest[0][1]} is intact and `--resume auto` continues from it"
        if newest
        else "no earlier checkpoint exists, so a rerun starts from step 0"
    )
    size = f" (a checkpoint takes {size_bytes(newest[0][1]) / 2**20:,.0f} MiB)" if newest else ""
    room = f"free space on that disk{size}, or move the run to a bigger one (--log-dir)"
    if fileio.is_disk_full(e):
        return (
            f"no room to write {path} ({e.strerror}); nothing else was lost: {kept}. Fix: {room}, "
            "then rerun the same command"
        )
    return (
        f"cannot write {path} ({e.strerror}): {kept}. Fix the folder's permissions or choose another --log-dir, "
        "then rerun"
    )


def resume(config: dict, model: torch.nn.Module, optimizer, parts: dict) -> Resumed | Finished:
    """Continue the run `config` (the TrainConfig's fields) from the newest checkpoint in its log dir,
    whatever world size wrote it: check it may continue this run (`resume_problem`), then load its state
    into `model`, `optimizer` and each of `parts` ({checkpoint key: stateful part}). Called on every
    rank. A fresh start: Resumed(0, ...); a finished run: Finished (nothing loaded)."""
    log_dir = Path(config["log_dir"])
    if config["resume"] == "never":
        if paths(log_dir):
            raise cli.UserError(
                f"{log_dir} already holds checkpoints of another run: pass a new --log-dir, "
                "or delete them, or use --resume auto"
            )
        return Resumed(0, False, None, [])
    ckpt = choose(log_dir)
    if ckpt is None:
        return Resumed(0, False, None, [])
    done = finished(ckpt, config)
    if done is not None:
        return done
    problem, changes = resume_problem(ckpt, config, model, parts)
    if problem:
        raise cli.UserError(problem)
    load_training_state(ckpt, model, optimizer)
    for name, part in parts.items():
        if name in ckpt:  # else a part that may start afresh (fresh_if_missing: the fp16 loss scaler)
            part.load_state_dict(ckpt[name])
    return Resumed(ckpt["step"], ckpt["evals_done"], ckpt["path"], changes)


def choose(log_dir: Path) -> dict | None:
    """The checkpoint every rank resumes from: rank 0 picks the newest one that loads, and every rank
    loads that one. (Each rank choosing for itself could pick different steps: a file half-visible on
    one node of a shared filesystem, a torn newest one that only some ranks can read.)"""
    import torch.distributed as dist

    is_main = not dist.is_initialized() or dist.get_rank() == 0
    chosen, problem = None, None
    if is_main:
        try:
            ckpt = load_latest(log_dir, warn=True)
            chosen = ckpt and ckpt["path"]
        except OSError as e:  # an unreadable folder: every rank learns it, none waits for rank 0
            problem = f"cannot read the checkpoints in {log_dir} ({cli.os_error_message(e)})"
    chosen, problem = runtime.broadcast_object((chosen, problem))
    if problem:
        raise cli.UserError(f"{problem}: fix its permissions or choose another --log-dir")
    if chosen is None:
        return None
    problem = None
    if not is_main:
        try:
            ckpt = {**load_file(chosen, required=TRAINING_KEYS), "path": chosen}
        except (ValueError, OSError) as e:
            problem = str(e)
    problem = runtime.first_problem(problem)
    if problem:
        raise cli.UserError(
            f"{problem}: the ranks see different files; put --log-dir on a filesystem every node shares"
        )
    return ckpt


def config_changes(saved: dict, config: dict, only: tuple[str, ...] | None = None) -> dict[str, str]:
    """{setting: "--flag old -> new"} for every setting (of `only`, if given) that differs from the
    checkpoint's config (flags that only say how to resume are not compared)."""
    return {
        name: f"--{name.replace('_', '-')} {saved[name]!r} -> {config[name]!r}"
        for name in (only or config)
        if name in saved and saved[name] != config[name] and name not in RESUME_FLAGS
    }


def finished(ckpt: dict, config: dict) -> Finished | None:
    """A signal during the last step leaves model_{max_steps}.pt, saved before the final evals:
    resuming it runs them and writes model_final.pt. Only that file (or a checkpoint past
    --max-steps) means the run is over."""
    log_dir, max_steps = Path(config["log_dir"]), config["max_steps"]
    if ckpt["step"] < max_steps or (ckpt["step"] == max_steps and not is_final(ckpt["path"])):
        return None
    changes = config_changes(ckpt["config"], config, only=RUN_SETTINGS)
    if changes:
        return Finished(
            f"{log_dir} holds a finished run with other settings ({'; '.join(changes.values())}): to train "
            f"with these settings, give the run its own folder, e.g. --log-dir {log_dir}_2",
            2,
        )
    return Finished(
        f"training already finished: {ckpt['path']} is at step {ckpt['step']} of {max_steps}, "
        f"nothing to do. To train again, pass a new --log-dir (e.g. --log-dir {log_dir}_2) or delete "
        f"{log_dir}/; to train longer, raise --max-steps",
        0,
    )


def resume_problem(ckpt: dict, config: dict, model, parts: dict) -> tuple[str | None, list[str]]:
    """THE place that decides whether `ckpt` can continue the run `config`: (why it cannot, or None;
    the changes it continues with). Refused even with --allow-config-change when the state cannot be
    loaded at all (another format, model or optimizer); a changed RESUME_REFUSED setting, or a part
    that says its state no longer fits (the loader: other data), only without that flag."""
    saved, path = ckpt["config"], ckpt["path"]
    if ckpt.get("format") != FORMAT_VERSION:
        return (
            f"{path} is a checkpoint of format {ckpt.get('format', 'none')}, this train_gpt2.py reads format "
            f"{FORMAT_VERSION}: resume with the version of the repo that wrote it, or start this run "
            "in a new --log-dir"
        ), []
    missing = [name for name, part in parts.items() if name not in ckpt and not getattr(part, "fresh_if_missing", 0)]
    if missing:  # a part added since it was written: its state is not there to restore
        return (
            f"{path} holds no state for {', '.join(missing)} (written before it was added): resume with the "
            "version of the repo that wrote it, or start this run in a new --log-dir"
        ), []
    if ckpt["model_config"] != model.model_config_dict():
        return (
            f"{path} holds another model ({saved['model']}: {ckpt['model_config']}) than --model "
            f"{config['model']}: resume with its --model, or start this run in a new --log-dir"
        ), []
    if saved["optimizer"] != config["optimizer"]:
        return (
            f"{path} was trained with --optimizer {saved['optimizer']}: resume with it, or start "
            f"--optimizer {config['optimizer']} in a new --log-dir"
        ), []
    changes = config_changes(saved, config)
    refused = [text for name, text in changes.items() if name in RESUME_REFUSED]
    refused += [why for name, part in parts.items() if name in ckpt and (why := _part_problem(part, ckpt[name]))]
    if refused and not config["allow_config_change"]:
        return (
            f"{path} was saved with other settings ({'; '.join(refused)}): resuming would not continue that "
            "run. Use the checkpoint's settings and data, a new --log-dir, or --allow-config-change if intended"
        ), []
    return None, refused + [text for name, text in changes.items() if name not in RESUME_REFUSED]


def _part_problem(part, state) -> str | None:
    """What a stateful part says makes `state` another run's (its resume_problem, if it has one)."""
    return part.resume_problem(state) if hasattr(part, "resume_problem") else None


# ---- Hugging Face ---------------------------------------------------------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hugging Face Hub at all? (A machine without network fails
    here in milliseconds; transformers would retry for ~30 s before saying so.)"""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout
        ):
            return True
    except OSError:
        return False


def load_hf_model(name: str, flag: str = "--hf", device: str | torch.device = "cpu") -> GPT:
    """A transformers GPT-2 (a Hub name such as gpt2-medium, or a folder such as an export_hf.py
    output) as our GPT, in eval mode, built on `device`. Looks in the local cache / folder first; goes
    to the network only when that fails and the Hub is reachable; fails at once, in one line, when it
    is not."""
    from huggingface_hub import constants
    from transformers import AutoConfig, GPT2LMHeadModel

    folder, offline = Path(name).is_dir(), constants.HF_HUB_OFFLINE

    def fail(reason: str) -> cli.UserError:
        if offline:  # already set: what is missing is a cache that holds the model
            fix = (
                f"load it once on a machine with network, with the same HF_HOME ({constants.HF_HOME}), or pass "
                "a local folder such as an export_hf.py output"
            )
        else:
            fix = (
                "a Hub name needs the network once; on an offline node, set HF_HUB_OFFLINE=1 with HF_HOME pointing "
                "to a cache filled on a networked machine, or pass a local folder such as an export_hf.py output"
            )
        return cli.UserError(f"{flag} {name}: {reason}; {fix}")

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
                raise cli.UserError(
                    f"{flag} {name} is a {hf_config.model_type!r} model: only GPT-2 models load into this repo's GPT"
                )
            hf = GPT2LMHeadModel.from_pretrained(name, local_files_only=local)
            break
        except OSError as e:
            if not local:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise fail(f"could not load it ({first})") from None
    with torch.device(device):
        model = GPT(gpt_config_from_hf(hf.config))
    return load_hf_state_dict(model, hf.state_dict()).eval()
