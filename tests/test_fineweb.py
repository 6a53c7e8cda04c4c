"""fineweb.py: token stream, determinism, resume after SIGKILL, --verify, bad input, offline Hub.

Everything is real: tiktoken, Hugging Face `datasets` reading local files, worker processes, files on
disk, a real SIGKILL, a real "no room" write error (EFBIG under a file-size limit, `ulimit -f`). The
oracle for the token stream is computed here independently: pyarrow reads the parquet, tiktoken's
encode_ordinary encodes each document.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import demo_texts, limit_file_size

import cli
import fineweb
from fineweb import FinewebConfig, PrepError, prepare
from tokenizer import EOT_TOKEN, get_encoding

ROOT = Path(__file__).resolve().parent.parent
SHARD = 50_000  # small shards: ~13 of them over the subset, most boundaries inside a document


@pytest.fixture(scope="module")
def subset(demo_parquet, tmp_path_factory) -> list[str]:
    """The demo corpus (348 real FineWeb documents, 571K tokens) as 4 parquet files, so several input
    files are read in order, with all the source's columns (id, text, url)."""
    table = pq.read_table(demo_parquet)
    out = tmp_path_factory.mktemp("subset")
    bounds = np.linspace(0, table.num_rows, 5).astype(int)
    paths = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        paths.append(str(out / f"part-{i}.parquet"))
        pq.write_table(table.slice(start, stop - start), paths[-1])
    return paths


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A private `datasets` cache, so tests never touch the user's ~/.cache."""
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture
def cli_cache(cache, monkeypatch):
    """fineweb.main() in this process uses `datasets`' default cache: the private one instead."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(cache))


def texts_of(files: list[str]) -> list[str]:
    return [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]


def expected_stream(texts: list) -> np.ndarray:
    enc = get_encoding()
    return np.concatenate([np.array([EOT_TOKEN] + enc.encode_ordinary(t), dtype=np.uint16) for t in texts if t])


def read_stream(out_dir: Path, manifest: dict) -> np.ndarray:
    return np.concatenate([np.load(out_dir / s["file"]) for s in manifest["shards"]])


def run(files, out_dir, cache, **kw) -> dict:
    return prepare(FinewebConfig(input=tuple(files), out_dir=str(out_dir), **kw), cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def reference(subset, cache, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run: 2 workers, map-style (Arrow) dataset."""
    out = tmp_path_factory.mktemp("reference")
    return out, run(subset, out, cache, shard_size=SHARD, workers=2)


def sha_list(manifest: dict) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


def env_for_cli(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------------------------
# Token stream


def test_shards_hold_every_document_in_order_across_shard_boundaries(subset, reference):
    out, manifest = reference
    texts = texts_of(subset)
    expected = expected_stream(texts)
    stream = read_stream(out, manifest)
    assert stream.dtype == np.uint16
    np.testing.assert_array_equal(stream, expected)  # nothing lost or repeated at any boundary
    shards = manifest["shards"]
    assert len(shards) == -(-len(expected) // SHARD) >= 10
    assert [s["tokens"] for s in shards[:-1]] == [SHARD] * (len(shards) - 1)  # filled exactly
    assert [s["file"] for s in shards[:2]] == ["edufineweb_val_000000.npy", "edufineweb_train_000001.npy"]
    assert {s["split"] for s in shards[1:]} == {"train"} and shards[0]["split"] == "val"
    assert manifest["complete"] and manifest["total_tokens"] == len(expected)
    assert manifest["total_documents"] == sum(s["documents"] for s in shards) == len(texts)
    # documents counted where their <|endoftext|> is
    eot_per_shard = [int((np.load(out / s["file"]) == EOT_TOKEN).sum()) for s in shards]
    assert eot_per_shard == [s["documents"] for s in shards]
    enc = get_encoding()
    assert enc.decode(stream.tolist()) == "".join("<|endoftext|>" + t for t in texts)


def test_shard_files_are_plain_npy_identical_to_np_save(reference, tmp_path):
    out, manifest = reference
    for record in manifest["shards"][:3]:
        data = (out / record["file"]).read_bytes()
        np.save(tmp_path / "x.npy", np.load(out / record["file"]))
        assert data == (tmp_path / "x.npy").read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]


def test_one_worker_streaming_and_spawned_workers_write_identical_shards(subset, cache, reference, tmp_path):
    _, ref = reference
    one = run(subset, tmp_path / "one", cache, shard_size=SHARD, workers=1)
    streamed = run(subset, tmp_path / "stream", cache, shard_size=SHARD, workers=2, streaming=True)
    # spawn = the start method of Windows and macOS: the workers must get everything by pickling
    spawned = prepare(
        FinewebConfig(input=tuple(subset), out_dir=str(tmp_path / "spawn"), shard_size=SHARD, workers=2),
        cache_dir=cache,
        mp_context="spawn",
        progress=False,
    )
    assert ref["shards"] == one["shards"] == streamed["shards"] == spawned["shards"]


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_after_a_crash_mid_document_is_byte_identical(subset, cache, reference, tmp_path):
    ref_dir, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref_dir, out)
    # The state a crash leaves after shard k: manifest lists k shards, later files may exist.
    k = next(i for i, s in enumerate(ref["shards"][2:], 2) if s["next_document_offset"] > 0)
    crashed = dict(ref, complete=False, shards=ref["shards"][: k + 1])
    (out / "manifest.json").write_text(json.dumps(crashed))
    (out / ref["shards"][k + 2]["file"]).unlink()  # a later shard missing; k+1 unrecorded but present
    (out / ref["shards"][k + 1]["file"]).write_bytes(b"stale")
    # temp files of writes the crash interrupted (random suffixes: fileio.atomic_path's temp names)
    stale_temps = [out / f".shard-{k + 1:06d}.k2x9_q.tmp", out / ".manifest.json.a8f3z1.tmp"]
    for p in stale_temps:
        p.write_bytes(b"half-written")
    # resumed in streaming mode: the same rows, skipped with IterableDataset.skip instead of by index
    resumed = run(subset, out, cache, shard_size=SHARD, workers=2, streaming=True)
    assert resumed["shards"] == ref["shards"]
    assert sha_list(resumed) == [hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() for s in ref["shards"]]
    assert not any(p.exists() for p in stale_temps) and not list(out.glob(".*.tmp"))


def test_max_tokens_stops_early_and_a_longer_rerun_continues(subset, cache, reference, tmp_path):
    ref_dir, ref = reference
    short = run(subset, tmp_path, cache, shard_size=SHARD, workers=2, max_tokens=123_456)
    assert short["total_tokens"] == 123_456 and short["stop_reason"] == "max_tokens"
    np.testing.assert_array_equal(read_stream(tmp_path, short), read_stream(ref_dir, ref)[:123_456])
    full = run(subset, tmp_path, cache, shard_size=SHARD, workers=2)  # partial last shard redone
    assert full["shards"] == ref["shards"]
    with pytest.raises(PrepError, match="other settings.*shard_size"):
        run(subset, tmp_path, cache, shard_size=SHARD + 1, workers=2)


def test_a_moved_input_file_still_matches_its_manifest(subset, cache, tmp_path, capsys):
    """A renamed checkout (the demo's input lives in it) or a moved data folder: the same file name and
    size is the same input, also for a manifest that recorded only the absolute path (older runs)."""
    first = tmp_path / "before" / "part-0.parquet"
    first.parent.mkdir()
    shutil.copy(subset[0], first)
    out = tmp_path / "out"
    made = run([first], out, cache, shard_size=SHARD, workers=1)
    assert made["settings"]["source"]["files"] == [
        {"name": "part-0.parquet", "bytes": first.stat().st_size, "path": str(first)}
    ]
    moved = tmp_path / "renamed-checkout" / "part-0.parquet"
    moved.parent.mkdir()
    first.rename(moved)
    capsys.readouterr()
    assert run([moved], out, cache, shard_size=SHARD, workers=1) == made
    assert "already complete" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())  # as the previous fineweb.py wrote it
    manifest["settings"]["source"]["files"] = [{"path": str(first), "bytes": moved.stat().st_size}]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run([moved], out, cache, shard_size=SHARD, workers=1)["shards"] == made["shards"]
    assert "already complete" in capsys.readouterr().out
    other = tmp_path / "other" / "part-0.parquet"  # same name, other content: not the same input
    other.parent.mkdir()
    shutil.copy(subset[1], other)
    with pytest.raises(PrepError, match="other settings.*source.files"):
        run([other], out, cache, shard_size=SHARD, workers=1)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and process groups are POSIX")
def test_sigkill_mid_run_then_rerun_matches_uninterrupted_run(demo_parquet, cache, tmp_path):
    files = [str(demo_parquet)]  # 348 documents, 571K tokens
    shard = fineweb.MIN_SHARD_SIZE  # ~140 shards: a wide window to kill in
    expected = run(files, tmp_path / "straight", cache, shard_size=shard, workers=1)
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "fineweb.py"),
        "--input",
        *files,
        "--out-dir",
        str(out),
        "--shard-size",
        str(shard),
        "--workers",
        "1",
    ]
    env = env_for_cli(tmp_path)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)  # kill -9 of the main process, as a crash or scancel would
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its pool workers too, if any is still alive
        except ProcessLookupError:
            pass
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed["complete"] and 3 <= len(killed["shards"]) < len(expected["shards"])
    # whatever is under a real shard name is a complete shard
    for p in out.glob("edufineweb_*.npy"):
        assert len(np.load(p)) == shard, p.name
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout
    final = json.loads((out / "manifest.json").read_text())
    assert final["complete"] and sha_list(final) == sha_list(expected)
    assert [hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() for s in final["shards"]] == sha_list(expected)
    check = subprocess.run(
        [sys.executable, str(ROOT / "fineweb.py"), "--out-dir", str(out), "--verify"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0 and "all match" in check.stdout, check.stdout + check.stderr


# ---------------------------------------------------------------------------------------------
# --verify


def test_verify_names_each_bad_shard(reference, tmp_path, capsys):
    ref_dir, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref_dir, out)
    assert fineweb.main(["--out-dir", str(out), "--verify"]) == 0
    assert "all match" in capsys.readouterr().out
    names = [s["file"] for s in ref["shards"]]
    with open(out / names[1], "r+b") as f:  # truncated
        f.truncate(f.seek(0, 2) - 2)
    with open(out / names[2], "r+b") as f:  # one flipped byte
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0x01]))
    arr = np.load(out / names[3])  # an id no GPT-2 token has, with a manifest that agrees with the file
    arr[777] = 60_000
    np.save(out / names[3], arr)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][3]["sha256"] = hashlib.sha256((out / names[3]).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert fineweb.main(["--out-dir", str(out), "--verify"]) == 1  # the verdict, as cmp's
    printed, err = capsys.readouterr()
    assert f"BAD {names[1]}: " in printed and "truncated" in printed
    assert f"BAD {names[2]}: sha256" in printed
    assert f"BAD {names[3]}: token id 60000 at position 777" in printed
    assert all(n not in printed for n in names[:1] + names[4:])
    message = err.strip().splitlines()[-1]  # after the progress bar
    assert (
        message.startswith(f"{cli.script_name()}: error: --verify found")
        and names[1] in message
        and names[3] in message
    )


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem


def cli_error(capsys, *argv) -> str:
    assert cli.run_main(fineweb.main, list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the error comes after any progress output
    message = lines[-1]  # the whole message: the line that starts with the prefix is the last one
    assert message.startswith(f"{cli.script_name()}: error: ") and sum(": error: " in line for line in lines) == 1
    return message


def test_refused_flag_values_are_one_line_errors_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "o"
    assert "--shard-size must be a positive" in cli_error(capsys, "--shard-size", "0", "--out-dir", str(out))
    assert "--workers must be >= 0" in cli_error(capsys, "--workers", "-1", "--out-dir", str(out))
    assert "--max-tokens must be >= 0" in cli_error(capsys, "--max-tokens=-1e3", "--out-dir", str(out))
    assert "--out-dir must not be empty" in cli_error(capsys, "--out-dir", "")
    # thousands of shards too small to hold a training window: refused before anything is read
    small = cli_error(capsys, "--shard-size", "10", "--input", str(ROOT / "README.md"), "--out-dir", str(out))
    assert "--shard-size 10 is too small" in small and f"use {fineweb.MIN_SHARD_SIZE:,} or more" in small
    assert not out.exists()
    with pytest.raises(ValueError, match="--shard-size"):  # the config checks itself, however it is made
        FinewebConfig(shard_size=-5)


def test_every_documented_shard_size_is_accepted():
    """The command lines the READMEs and docs/ give (the demo's 100,000, the GPU check's 200,000, ...) stay valid."""
    import re

    pages = [ROOT / name for name in ("README.md", "assets/demo/README.md", "BENCHMARKS.md")]
    texts = [page.read_text() for page in pages + sorted((ROOT / "docs").glob("*.md"))]
    sizes = [int(float(v.replace("_", ""))) for t in texts for v in re.findall(r"--shard-size (\S+?)[`\s)]", t)]
    assert len(sizes) >= 4 and min(sizes) >= fineweb.MIN_SHARD_SIZE, sizes


def test_input_files_without_rows_are_named_and_no_out_dir_is_left(tmp_path, capsys):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["a document"]}), good)
    (tmp_path / "empty.jsonl").write_text("\n")
    out = tmp_path / "new" / "out"
    for argv in ([str(empty)], [str(good), str(empty)], [str(tmp_path / "empty.jsonl")]):
        message = cli_error(capsys, "--input", *argv, "--out-dir", str(out))
        assert f"input file {argv[-1]} has no rows" in message, message
    assert not (tmp_path / "new").exists()


def test_a_run_that_wrote_no_shard_removes_only_the_folders_it_created(tmp_path, capsys, cli_cache):
    blank = tmp_path / "blank.jsonl"  # rows, but no text in any
    blank.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(3)))
    argv = ["--input", str(blank), "--streaming", "--workers", "1"]
    assert "no tokens" in cli_error(capsys, *argv, "--out-dir", str(tmp_path / "new" / "out"))
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert "no tokens" in cli_error(capsys, *argv, "--out-dir", str(existing))
    assert (existing / "notes.txt").read_text() == "mine"


def test_a_run_with_no_train_shard_fails_saying_how_many_tokens_there_were(tmp_path, capsys, cli_cache):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"short document number {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    argv = ["--input", str(src), "--out-dir", str(out), "--streaming", "--workers", "1"]
    tokens = len(expected_stream([f"short document number {i}" for i in range(40)]))
    for _ in range(2):  # the run, then its rerun (already complete): the same refusal
        message = cli_error(capsys, *argv)
        assert f"no train shard: all {tokens:,} tokens went to val shard 0" in message
        assert "more input" in message and str(out) in message
    assert sorted(p.name for p in out.iterdir()) == ["edufineweb_val_000000.npy", "manifest.json"]


def test_no_input_files_is_a_one_line_error(tmp_path, capsys):
    message = cli_error(capsys, "--input", str(tmp_path / "nothing" / "*.parquet"), "--out-dir", str(tmp_path / "o"))
    assert "no input files" in message and "nothing" in message


def test_file_without_text_column_is_named(subset, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["no text column here"]}), bad)
    message = cli_error(capsys, "--input", subset[0], str(bad), "--out-dir", str(tmp_path / "o"))
    assert str(bad) in message and "no `text` column" in message and "body" in message
    bad_json = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad_json, "wt") as f:
        f.write(json.dumps({"content": "x"}) + "\n")
    message = cli_error(capsys, "--input", str(bad_json), "--out-dir", str(tmp_path / "o"))
    assert str(bad_json) in message and "no `text` column" in message


def test_unwritable_out_dir_is_a_one_line_error(subset, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    message = cli_error(capsys, "--input", subset[0], "--out-dir", str(a_file / "out"))
    assert "cannot write to --out-dir" in message
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere; the case above covers it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write to --out-dir" in cli_error(capsys, "--input", subset[0], "--out-dir", str(locked))


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX RLIMIT_FSIZE for a real write error")
def test_full_disk_is_a_one_line_error_and_leaves_no_shard(subset, tmp_path):
    out = tmp_path / "out"
    # A real no-room error from the real code path: the manifest (a few KB) fits under the 64 KiB
    # file-size limit, the first shard (SHARD tokens = 100 KB) does not, so its write fails with EFBIG.
    assert 2 * SHARD > 64 * 1024
    # --streaming: local files are read in place, nothing goes to the user's datasets cache
    cmd = [
        sys.executable,
        str(ROOT / "fineweb.py"),
        "--input",
        *subset,
        "--out-dir",
        str(out),
        "--shard-size",
        str(SHARD),
        "--streaming",
        "--workers",
        "1",
    ]
    out.mkdir()  # a folder that was there before is kept (one the run created goes: see above)
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**env_for_cli(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size(64 * 1024),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("fineweb.py: error: "), proc.stderr[-2000:]
    assert "disk full" in message and "rerun the same command" in message
    assert not list(out.glob("edufineweb_*")) and not list(out.glob(".shard-*"))  # no shard, no temp file
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # nothing else left behind either
    assert json.loads((out / "manifest.json").read_text())["shards"] == []


def test_empty_and_undecodable_documents_are_skipped_and_counted(cache, tmp_path):
    texts = ["first document", "", None, "fourth, with émoji 🚀", "", "a literal <|endoftext|> is text"]
    src = tmp_path / "docs.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    m = run([src], tmp_path / "json", cache, shard_size=7)
    assert (m["total_documents"], m["skipped_empty"], m["skipped_undecodable"]) == (3, 3, 0)
    np.testing.assert_array_equal(read_stream(tmp_path / "json", m), expected_stream(texts))
    # a binary `text` column holding bytes that are not UTF-8
    raw = [b"good one", b"\xff\xfe not utf-8 \xc3", "caf\u00e9".encode(), b""]
    src = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary())}), src)
    m = run([src], tmp_path / "bin", cache, shard_size=1000, streaming=True)
    assert (m["total_documents"], m["skipped_empty"], m["skipped_undecodable"]) == (2, 1, 1)
    np.testing.assert_array_equal(read_stream(tmp_path / "bin", m), expected_stream(["good one", "café"]))


def test_txt_files_are_one_document_each(cache, tmp_path):
    (tmp_path / "a.txt").write_text("First file.\n\nTwo paragraphs.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Second file.", encoding="utf-8")
    m = run([str(tmp_path / "*.txt")], tmp_path / "out", cache, shard_size=4)
    np.testing.assert_array_equal(
        read_stream(tmp_path / "out", m), expected_stream(["First file.\n\nTwo paragraphs.\n", "Second file."])
    )


# Text that is not UTF-8 is an undecodable document: skipped, counted, named; never a bare `datasets` error

LATIN1 = "Caf\u00e9 notes, d\u00e9j\u00e0 vu, na\u00efve fa\u00e7ade.\n" * 40  # 0xe9 at offset 3 in Latin-1


def test_a_txt_input_that_is_not_utf8_is_skipped_counted_and_named(tmp_path, capsys, cli_cache):
    texts = demo_texts()
    src = tmp_path / "notes"
    src.mkdir()
    (src / "a.txt").write_text("\n\n".join(texts[:3]), encoding="utf-8")
    (src / "b.txt").write_bytes(LATIN1.encode("latin-1"))
    (src / "c.txt").write_text(texts[3] + " caf\u00e9", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--input", str(src), "--out-dir", str(out), "--shard-size", str(fineweb.MIN_SHARD_SIZE), "--workers", "2"]
    assert cli.run_main(fineweb.main, argv) == 0
    printed = capsys.readouterr()
    assert [line for line in printed.err.splitlines() if "b.txt" in line] == [
        f"{cli.script_name()}: skipping {src / 'b.txt'}: not UTF-8 (byte 0xe9 at offset 3); "
        "convert it with `iconv -f latin1 -t utf-8`"
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    utf8 = [(src / name).read_text(encoding="utf-8") for name in ("a.txt", "c.txt")]
    np.testing.assert_array_equal(read_stream(out, manifest), expected_stream(utf8))
    assert len(manifest["shards"]) >= 2
    assert (manifest["total_documents"], manifest["skipped_empty"], manifest["skipped_undecodable"]) == (2, 0, 1)
    assert [f["name"] for f in manifest["settings"]["source"]["files"]] == ["a.txt", "b.txt", "c.txt"]
    assert "skipped 0 empty + 1 undecodable" in printed.out
    # the same command again: already complete, the manifest untouched, no second notice
    assert cli.run_main(fineweb.main, argv) == 0
    printed = capsys.readouterr()
    assert "already complete" in printed.out and "skipping" not in printed.err
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_only_txt_inputs_that_are_not_utf8_is_a_one_line_error(tmp_path, capsys, cli_cache):
    (tmp_path / "more.txt").write_bytes("UTF-16, with its byte-order mark".encode("utf-16"))
    (tmp_path / "notes.txt").write_bytes(LATIN1.encode("latin-1"))
    out = tmp_path / "out"
    assert cli.run_main(fineweb.main, ["--input", str(tmp_path / "*.txt"), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{cli.script_name()}: error: no tokens: every document of --input files was empty or ")
    assert "(0 empty, 2 undecodable)" in err and "1 more .txt input(s) are not UTF-8" in err
    assert f"{tmp_path / 'more.txt'} is not UTF-8 (byte 0xff at offset 0); convert it with `iconv -f utf-16" in err
    assert not out.exists()


def test_resume_past_skipped_txt_inputs_is_byte_identical(cache, tmp_path, capsys):
    """Left-out files are rows of the stream, at their place in --input: a resume from a shard that
    starts at a left-out file, from one inside a document, and from the last one, each writes what the
    uninterrupted run wrote (map-style and streaming)."""
    texts = demo_texts()
    src = tmp_path / "in"
    src.mkdir()
    utf8 = {"a.txt": texts[7], "c.txt": texts[1], "e.txt": texts[3]}
    for name, text in utf8.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "b.txt").write_bytes(LATIN1.encode("latin-1"))
    with gzip.open(src / "d.txt.gz", "wb") as f:
        # a UTF-8 character split across the check's 1 MiB reads, then the bad byte at 1 + 2**20 + 3
        f.write(b"a" + "\u00e9".encode() * (1 << 19) + LATIN1.encode("latin-1"))
    (src / "f.txt").write_bytes(LATIN1.encode("cp1252"))  # after the last loaded file
    shard = len(expected_stream([texts[7]]))  # shard 0 ends with a.txt: shard 1 starts at b.txt, left out
    ref_dir = tmp_path / "ref"
    ref = run([src], ref_dir, cache, shard_size=shard, workers=1)
    assert f"skipping {src / 'd.txt.gz'}: not UTF-8 (byte 0xe9 at offset 1,048,580)" in capsys.readouterr().err
    np.testing.assert_array_equal(read_stream(ref_dir, ref), expected_stream(list(utf8.values())))
    shards = ref["shards"]
    assert (ref["total_documents"], ref["skipped_undecodable"]) == (3, 3)
    assert (shards[0]["next_document"], shards[0]["next_document_offset"]) == (1, 0)  # rows number the inputs
    assert shards[1]["skipped_undecodable"] >= 1 and shards[-1]["skipped_undecodable"] >= 1  # b.txt; f.txt
    mid = next(k for k in range(2, len(shards)) if shards[k - 1]["next_document_offset"] > 0)
    for i, keep in enumerate((1, mid, len(shards) - 1)):
        out = tmp_path / f"crashed-{keep}"
        shutil.copytree(ref_dir, out)
        (out / "manifest.json").write_text(json.dumps(dict(ref, complete=False, shards=shards[:keep])))
        resumed = run([src], out, cache, shard_size=shard, workers=1, streaming=i % 2 == 1)
        assert resumed == ref and json.loads((out / "manifest.json").read_text()) == ref, keep


def test_jsonl_rows_that_are_not_utf8_are_skipped_and_counted(cache, tmp_path, capsys, cli_cache):
    """Arrow's JSON reader loads a string value that is not UTF-8: that row is an undecodable document."""
    texts = [f"document {i}, caf\u00e9" for i in range(5)]
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in texts]
    src = tmp_path / "mixed.jsonl.gz"
    with gzip.open(src, "wb") as f:
        f.write(b"".join(lines[:2] + [b'{"text": "caf\xe9 in Latin-1"}\n'] + lines[2:]))
    for streaming in (False, True):
        out = tmp_path / f"streaming-{streaming}"
        m = run([src], out, cache, shard_size=7, streaming=streaming)
        assert (m["total_documents"], m["skipped_empty"], m["skipped_undecodable"]) == (5, 0, 1)
        np.testing.assert_array_equal(read_stream(out, m), expected_stream(texts))
    # not UTF-8 in a key: the load itself fails, so one line names the file and the fix
    key = tmp_path / "key.jsonl"
    key.write_bytes(lines[0] + b'{"te\xe9xt": "x", "text": "y"}\n')
    message = cli_error(capsys, "--input", str(key), "--out-dir", str(tmp_path / "o"))
    assert f"{key} is not UTF-8 (byte 0xe9 at offset {len(lines[0]) + 4});" in message and "iconv" in message


def test_hub_without_network_fails_fast_with_one_line(tmp_path, monkeypatch):
    env = {**env_for_cli(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fineweb.py"), "--out-dir", str(tmp_path / "o")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and time.time() - t < 60
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fineweb.py: error: cannot load HuggingFaceFW/fineweb-edu (sample-10BT)"), proc.stderr
    assert "HF_HUB_OFFLINE is set" in last and "set HF_HUB_OFFLINE=1" not in last and "--input" in last
    assert not (tmp_path / "o").exists()  # the out dir it created, with no shard in it, is gone
    from huggingface_hub import constants  # online, the same failure advises going offline

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert "set HF_HUB_OFFLINE=1 with HF_HOME" in fineweb._hub_hint(FinewebConfig(), OSError("no route"))


def test_importing_does_nothing(tmp_path):
    code = "import sys, fineweb; assert 'datasets' not in sys.modules; print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env_for_cli(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout == "ok\n" and proc.stderr == "", proc.stderr


def test_shards_and_manifest_follow_the_umask(cache, tmp_path):
    """Written through temp files, yet with the modes any new file gets: teammates can read them."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(20)))
    old = os.umask(0o027)
    try:
        run([src], tmp_path / "out", cache, shard_size=30)
    finally:
        os.umask(old)
    files = list((tmp_path / "out").iterdir())
    assert len(files) >= 3 and all(p.stat().st_mode & 0o777 == 0o640 for p in files), {
        p.name: oct(p.stat().st_mode & 0o777) for p in files
    }
