"""The token-shard loaders: windows, rank striding, world-size-independent steps, shuffling, resume, errors.

Every test writes its own real shards (np.save of uint16 arrays, as fineweb.py does) in a tmp dir.
Token values are unique across all shards, so a row's first token says where it came from.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import checkpoint
import cli
import runtime
import train_gpt2
from dataloader import DataError, TrainLoader, ValLoader, list_shards, load_shard, main
from metrics import MetricsLog
from train_gpt2 import TrainConfig

CPU = runtime.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)

T = 8  # tokens per window in these tests
TRAIN_LENGTHS = (50, 33, 70, 9, 41)  # (L-1)//T windows: 6, 4, 8, 1, 5 -> N = 24 (not a multiple of B)
VAL_LENGTH = 90


def write_shards(data_dir, train_lengths=TRAIN_LENGTHS, val_length=VAL_LENGTH):
    """Reference-named shards whose tokens are unique ids: shard i holds 1000*i + 0..L-1."""
    data_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, length in enumerate([val_length, *train_lengths]):
        if length is None:
            continue
        split = "val" if i == 0 else "train"
        tokens = np.asarray(1000 * i + np.arange(length), dtype=np.uint16)
        path = data_dir / f"edufineweb_{split}_{i:06d}.npy"
        np.save(path, tokens)
        arrays[path.name] = tokens
    return arrays


def sequential_windows(arrays, split="train"):
    """Every window of a split by slicing the raw arrays in sorted shard order: (N, T+1)."""
    rows = []
    for name in sorted(arrays):
        if f"_{split}_" in name:
            tokens = arrays[name]
            rows += [tokens[w * T : w * T + T + 1] for w in range((len(tokens) - 1) // T)]
    return np.stack(rows).astype(np.int64)


def batch_rows(x, y):
    """Rebuild (B, T+1) windows from a batch, checking that y is x shifted by one."""
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    return torch.cat([x, y[:, -1:]], dim=1).numpy()


def step_rows(loaders, accum):
    """One optimizer step: `accum` micro-steps on every rank, concatenated in (micro-step, rank) order."""
    return np.concatenate([batch_rows(*ld.next_batch()) for _ in range(accum) for ld in loaders])


def make_ranks(data_dir, world, B, **kw):
    return [TrainLoader(data_dir, B, T, rank=r, world_size=world, **kw) for r in range(world)]


@pytest.fixture
def data(tmp_path):
    return tmp_path / "shards", write_shards(tmp_path / "shards")


# ------------------------------------------------------------------------------ windows and order


def test_no_shuffle_reads_sequential_windows_and_wraps_epochs(data):
    data_dir, arrays = data
    expected = sequential_windows(arrays)  # (24, T+1)
    loader = TrainLoader(data_dir, 5, T, shuffle=False)
    assert loader.num_windows == len(expected) == 24
    got = np.concatenate([batch_rows(*loader.next_batch()) for _ in range(12)])  # 60 rows = 2.5 epochs
    np.testing.assert_array_equal(got, np.concatenate([expected, expected, expected[:12]]))
    assert loader.state_dict()["epoch"] == 2


def test_batches_are_fresh_int64_tensors_and_pin_memory_without_cuda_warns(data):
    data_dir, _ = data
    with pytest.warns(UserWarning, match="pin_memory ignored"):
        loader = TrainLoader(data_dir, 4, T, pin_memory=True)
    x1, y1 = loader.next_batch()
    x2, _ = loader.next_batch()
    assert x1.shape == y1.shape == (4, T) and x1.is_contiguous() and y1.is_contiguous()
    assert not x1.is_pinned()
    assert x1.untyped_storage().data_ptr() != x2.untyped_storage().data_ptr()
    assert x1.untyped_storage().data_ptr() != y1.untyped_storage().data_ptr()


def test_load_shard_memory_maps_instead_of_reading(data):
    data_dir, arrays = data
    path = list_shards(data_dir, "train")[0]
    tokens = load_shard(path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, arrays[path.name])


def test_list_shards_sorted_and_split_filtered(data):
    data_dir, _ = data
    (data_dir / "manifest.json").write_text("{}")
    (data_dir / "edufineweb_train_000009.npy.tmp").write_bytes(b"partial")
    names = [p.name for p in list_shards(data_dir, "train")]
    assert names == [f"edufineweb_train_{i:06d}.npy" for i in range(1, 6)]
    assert [p.name for p in list_shards(data_dir, "val")] == ["edufineweb_val_000000.npy"]


# ------------------------------------------------------------------------------ striding


def test_ranks_never_overlap_in_a_step_and_union_is_the_one_process_step(data):
    data_dir, _ = data
    single = TrainLoader(data_dir, 2, T)
    ranks = make_ranks(data_dir, 4, 2)
    for _ in range(5):
        per_rank = [[batch_rows(*ld.next_batch()) for _ in range(2)] for ld in ranks]  # 4 ranks x 2 micro
        ids = [set(np.concatenate(b)[:, 0].tolist()) for b in per_rank]
        assert all(len(ids[r] & ids[q]) == 0 for r in range(4) for q in range(r + 1, 4))
        one = np.concatenate([batch_rows(*single.next_batch()) for _ in range(8)])
        assert set().union(*ids) == set(one[:, 0].tolist()) and len(one) == 16


@pytest.mark.parametrize("world,accum,B", [(2, 4, 4), (8, 1, 4), (1, 4, 8), (4, 1, 8), (1, 16, 2)])
def test_step_tokens_do_not_depend_on_world_size_or_micro_batch_split(data, world, accum, B):
    # Reference: 1 process, B=4 x 8 micro-steps = 32 rows per step (more than an epoch of 24 rows).
    data_dir, _ = data
    ref = make_ranks(data_dir, 1, 4)
    other = make_ranks(data_dir, world, B)
    assert world * accum * B == 32
    for _ in range(4):
        np.testing.assert_array_equal(step_rows(other, accum), step_rows(ref, 8))


# ------------------------------------------------------------------------------ shuffling


def epoch_firsts(loader, epochs):
    """First token of each row, per epoch (one batch = one row)."""
    n = loader.num_windows
    return [[int(loader.next_batch()[0][0, 0]) for _ in range(n)] for _ in range(epochs)]


def test_shuffle_is_deterministic_per_seed_and_redrawn_each_epoch(data):
    data_dir, arrays = data
    all_windows = sorted(sequential_windows(arrays)[:, 0].tolist())
    a = epoch_firsts(TrainLoader(data_dir, 1, T, seed=7), 4)
    b = epoch_firsts(TrainLoader(data_dir, 1, T, seed=7), 4)
    c = epoch_firsts(TrainLoader(data_dir, 1, T, seed=8), 4)
    assert a == b
    assert a != c
    for epoch in a + c:
        assert sorted(epoch) == all_windows  # each epoch is a permutation of every window
    assert a[0] != a[1] and a[1] != a[2]
    assert a[0] != sorted(a[0])  # really shuffled (probability of identity: 1/24!)
    # Both levels are re-drawn each epoch: the order of shards, and the order of windows in a shard.
    shard_orders = [tuple(dict.fromkeys(w // 1000 for w in epoch)) for epoch in a]
    assert shard_orders[0] != tuple(sorted(shard_orders[0]))
    assert len(set(shard_orders)) > 1
    in_shard_3 = [tuple(w for w in epoch if w // 1000 == 3) for epoch in a]  # the 8-window shard
    assert len(set(in_shard_3)) > 1 and in_shard_3[0] != tuple(sorted(in_shard_3[0]))


def test_shuffled_rows_match_the_raw_windows(data):
    data_dir, arrays = data
    by_first = {int(r[0]): r for r in sequential_windows(arrays)}
    loader = TrainLoader(data_dir, 6, T, seed=3)
    for _ in range(10):
        for row in batch_rows(*loader.next_batch()):
            np.testing.assert_array_equal(row, by_first[int(row[0])])


# ------------------------------------------------------------------------------ state / resume


def test_state_round_trip_continues_identically(data):
    data_dir, _ = data
    straight = TrainLoader(data_dir, 4, T)
    for _ in range(9):  # 36 rows: past the first epoch boundary (24)
        straight.next_batch()
    state = straight.state_dict()
    assert state == {"rows_consumed": 36, "epoch": 1, "seed": 1337, "seq_len": T, "shuffle": True, "num_windows": 24}
    resumed = TrainLoader(data_dir, 4, T)
    resumed.load_state_dict(state)
    for _ in range(10):
        np.testing.assert_array_equal(batch_rows(*resumed.next_batch()), batch_rows(*straight.next_batch()))


@pytest.mark.parametrize("resume_world,resume_B,resume_accum", [(2, 2, 2), (1, 4, 2), (1, 8, 1)])
def test_state_saved_at_world_4_resumes_at_smaller_worlds(data, resume_world, resume_B, resume_accum):
    data_dir, _ = data
    straight = make_ranks(data_dir, 1, 2)  # the uninterrupted run: 8 rows per step, 1 process
    for _ in range(3):
        step_rows(straight, 4)
    saved = make_ranks(data_dir, 4, 2)  # 4 ranks x 1 micro-step, 3 steps
    for _ in range(3):
        step_rows(saved, 1)
    states = [ld.state_dict() for ld in saved]
    assert all(s == states[0] for s in states) and states[0]["rows_consumed"] == 24
    resumed = make_ranks(data_dir, resume_world, resume_B)
    for ld in resumed:
        ld.load_state_dict(states[0])
    for _ in range(5):
        np.testing.assert_array_equal(step_rows(resumed, resume_accum), step_rows(straight, 4))


TINY = dict(
    model="tiny",
    micro_batch_size=4,
    seq_len=T,
    tokens_per_step=4 * T,
    device="cpu",
    compile=False,
    val_every=0,
    hellaswag_every=0,
)


def _saved_run(data_dir, tmp_path, **flags):
    """A real checkpoint of a tiny run on `data_dir` (windows of T tokens), as the trainer reads it back."""
    cfg = TrainConfig(**{**TINY, "data_dir": str(data_dir), **flags})
    run = train_gpt2.build_run(cfg, CPU)
    path = train_gpt2.save_checkpoint(
        run, MetricsLog(tmp_path / "m.jsonl", False), tmp_path / "model_00005", step=5, evals_done=True, keep=None
    )
    return {**checkpoint.load_file(path, required=checkpoint.TRAINING_KEYS), "path": str(path)}


def _resume_problem(ckpt, data_dir, **flags):
    cfg = TrainConfig(**{**TINY, "data_dir": str(data_dir), **flags})
    run = train_gpt2.build_run(cfg, CPU)
    parts = train_gpt2.stateful_parts(run, MetricsLog(data_dir / "unused", False))
    return checkpoint.resume_problem(ckpt, dataclasses.asdict(cfg), run.model, parts)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seed": 1}, "--seed 1337 -> 1"),
        ({"shuffle": False}, "--shuffle True -> False"),
        ({"seq_len": 2 * T, "tokens_per_step": 8 * T}, f"--seq-len {T} -> {2 * T}"),
    ],
)
def test_the_trainer_refuses_a_loader_state_of_a_different_run(data, tmp_path, kwargs, match):
    """Whether a loader state continues this run is decided in one place (checkpoint.resume_problem,
    which asks the loader whether its data changed); the loader itself takes any state."""
    data_dir, _ = data
    ckpt = _saved_run(data_dir, tmp_path)
    problem, _ = _resume_problem(ckpt, data_dir, **kwargs)
    assert match in problem and "--allow-config-change" in problem
    problem, changes = _resume_problem(ckpt, data_dir, allow_config_change=True, **kwargs)
    assert problem is None and any(match in change for change in changes)


def test_the_trainer_refuses_changed_data(tmp_path):
    write_shards(tmp_path / "a")
    ckpt = _saved_run(tmp_path / "a", tmp_path)
    write_shards(tmp_path / "b", train_lengths=(50, 33))
    problem, _ = _resume_problem(ckpt, tmp_path / "b")
    assert "data changed" in problem and "24 windows" in problem


# ------------------------------------------------------------------------------ validation set


@pytest.mark.parametrize("world,B", [(1, 4), (1, 3), (3, 2), (4, 5), (8, 1), (16, 2)])
def test_val_set_is_the_same_fixed_windows_for_any_world_and_batch(data, world, B):
    data_dir, arrays = data
    val_tokens = 85  # -> 10 windows of 8 (needs 81 of the 90 tokens)
    expected = sequential_windows({"v_val_0.npy": arrays["edufineweb_val_000000.npy"][:81]}, "val")
    valid, masked_sum, counts = [], 0, set()
    for r in range(world):
        loader = ValLoader(data_dir, B, T, val_tokens, rank=r, world_size=world)
        assert loader.num_windows == 10
        batches = list(loader)
        counts.add(len(batches))
        for x, y, num_valid in batches:
            rows = batch_rows(x, y)
            assert rows.shape == (B, T + 1)  # fixed shapes: padded, never a short batch
            valid.append(rows[:num_valid])
            for pad in rows[num_valid:]:  # padding rows are copies of real windows
                assert any((pad == e).all() for e in expected)
            mask = (torch.arange(B) < num_valid)[:, None]  # how the trainer masks padded rows
            masked_sum += int((y * mask).sum())
    assert len(counts) == 1  # every rank runs the same number of batches
    valid = np.concatenate(valid)
    np.testing.assert_array_equal(valid[np.argsort(valid[:, 0])], expected)
    assert masked_sum == int(expected[:, 1:].sum())


def test_val_uses_the_first_val_shard(tmp_path):
    write_shards(tmp_path)
    np.save(tmp_path / "edufineweb_val_000099.npy", np.full(500, 7, dtype=np.uint16))
    x, _, num_valid = next(iter(ValLoader(tmp_path, 2, T, 16)))
    assert num_valid == 2 and x[0, 0] == 0 and x[1, 0] == T


# ------------------------------------------------------------------------------ errors


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"does not exist: run `uv run fineweb.py` first or pass --data-dir"):
        TrainLoader(tmp_path / "nope", 4, T)
    assert issubclass(DataError, cli.UserError)


def test_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match="no train shards"):
        TrainLoader(tmp_path, 4, T)


def test_no_val_shard(tmp_path):
    write_shards(tmp_path, val_length=None)
    TrainLoader(tmp_path, 4, T)  # train alone is fine
    with pytest.raises(DataError, match="no val shard"):
        ValLoader(tmp_path, 4, T, 64)


@pytest.mark.parametrize("keep_bytes", [0, 20, 100, -10])
def test_truncated_shard(data, keep_bytes):
    data_dir, _ = data
    path = data_dir / "edufineweb_train_000003.npy"
    raw = path.read_bytes()
    path.write_bytes(raw[:keep_bytes])  # empty, mid-magic, mid-header, short body
    with pytest.raises(DataError, match=r"edufineweb_train_000003\.npy is truncated.*fineweb.py --verify"):
        TrainLoader(data_dir, 4, T)


def test_wrong_dtype_shard(data):
    data_dir, _ = data
    np.save(data_dir / "edufineweb_train_000002.npy", np.arange(50, dtype=np.int32))
    with pytest.raises(DataError, match=r"edufineweb_train_000002\.npy has dtype int32, expected uint16"):
        TrainLoader(data_dir, 4, T)


def test_wrong_ndim_shard(data):
    data_dir, _ = data
    np.save(data_dir / "edufineweb_val_000000.npy", np.zeros((10, 10), dtype=np.uint16))
    with pytest.raises(DataError, match=r"shape \(10, 10\), expected a 1-D"):
        ValLoader(data_dir, 4, T, 64)


def test_shard_too_small_for_one_batch(tmp_path):
    write_shards(tmp_path, train_lengths=(20,))  # 2 windows of 8+1 tokens
    TrainLoader(tmp_path, 2, T)
    with pytest.raises(DataError, match=r"2 windows of seq_len=8.*micro-batch of 3.*smaller --seq-len"):
        TrainLoader(tmp_path, 3, T)


def test_val_too_short(data):
    data_dir, _ = data  # 90 val tokens -> at most 11 windows of 8 = 88 tokens
    ValLoader(data_dir, 4, T, 88)
    with pytest.raises(DataError, match="too few for --val-tokens 96.*use --val-tokens 88 or less"):
        ValLoader(data_dir, 4, T, 96)
    with pytest.raises(DataError, match="less than one window"):
        ValLoader(data_dir, 4, T, 7)


def test_bad_sizes_and_ranks(data):
    data_dir, _ = data
    with pytest.raises(ValueError, match="rank 2 is not in"):
        TrainLoader(data_dir, 4, T, rank=2, world_size=2)
    with pytest.raises(ValueError, match="--micro-batch-size"):
        ValLoader(data_dir, 0, T, 64)
    with pytest.raises(ValueError, match="--seed"):
        TrainLoader(data_dir, 4, T, seed=-1)


def test_cli_summary_and_one_line_error(data, capsys):
    data_dir, _ = data
    main(["--data-dir", str(data_dir), "--micro-batch-size", "4", "--seq-len", "8", "--val-tokens", "64"])
    out = capsys.readouterr().out
    assert "5 shards, 203 tokens, 24 windows" in out and "val:   8 windows" in out
    assert cli.run_main(main, ["--data-dir", str(data_dir / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{cli.script_name()}: error: data dir ") and "does not exist" in err and err.count("\n") == 1


def test_token_ids_out_of_range_name_the_shard_when_read(data):
    """A shard holding ids >= 50257 (random bytes) is named, with the command that checks every
    shard, when a batch reads it (train) or when the fixed set is loaded (val), never an IndexError."""
    data_dir, arrays = data
    bad = np.load(data_dir / "edufineweb_train_000003.npy")
    bad[5] = 60_000
    np.save(data_dir / "edufineweb_train_000003.npy", bad)
    loader = TrainLoader(data_dir, 4, T, shuffle=False)  # opening is lazy: only mapped, never scanned
    with pytest.raises(DataError, match=r"edufineweb_train_000003\.npy holds token id 60000.*fineweb.py.*--verify"):
        for _ in range(loader.num_windows // 4 + 1):
            loader.next_batch()
    val = np.load(data_dir / "edufineweb_val_000000.npy")
    val[80] = 50_257
    np.save(data_dir / "edufineweb_val_000000.npy", val)
    ValLoader(data_dir, 4, T, 64)  # the fixed set ends before the bad id
    with pytest.raises(DataError, match=r"edufineweb_val_000000\.npy holds token id 50257"):
        ValLoader(data_dir, 4, T, 88)
