"""HellaSwag: both scoring styles against a plain per-example loop, ranks, data errors, the CLI.

The model is a small random GPT (2 layers, width 16) with a 96-token context, so some of the real
examples are longer than the context and the left-truncation path runs too.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import checkpoint
import cli
import hellaswag
import runtime
from hellaswag_eval import (
    HELLASWAG_SHA256,
    accuracies,
    download,
    evaluate_hellaswag,
    harness_encode_pair,
    harness_preprocess,
    harness_query,
    load_examples,
    score_examples,
    verify_sha256,
)
from model import GPT, GPTConfig
from tokenizer import get_encoding

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 96}  # longest ending: 77 tokens
NUM_EXAMPLES = 120  # the batched-vs-loop comparison (slow); the quick tests use the first QUICK_EXAMPLES
QUICK_EXAMPLES = 40
CPU = runtime.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)


def small_model(seed: int = 1234) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return small_model()


@pytest.fixture(scope="module")
def examples(hellaswag_val_path) -> list[dict]:
    return load_examples(hellaswag_val_path, limit=NUM_EXAMPLES, verify=False)  # the fixture is a subset


@pytest.fixture(scope="module")
def batched(model, examples):
    """The batched scorer's per-ending log-likelihoods, both styles, on the first QUICK_EXAMPLES examples.
    (16 rows per forward: on CPU the (rows, T, 50257) logits of bigger batches fall out of cache.)"""
    return score_examples(model, examples[:QUICK_EXAMPLES], CPU, batch_size=16)


# ---- an independent, plain implementation of both definitions --------------------------------
def clean(text: str) -> str:
    """lm-evaluation-harness hellaswag preprocess, written out again for the test."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


@torch.no_grad()
def loop_loglik(model: GPT, tokens: list[int], n_ending: int) -> float:
    """One sequence, one forward: sum of log p over its last n_ending tokens (left-truncated to fit)."""
    tokens = tokens[-(model.config.block_size + 1) :]
    logits, _ = model(torch.tensor(tokens[:-1])[None])  # (1, T, vocab): position t predicts token t + 1
    first = len(tokens) - 1 - n_ending  # the position that predicts the ending's first token
    logprobs = F.log_softmax(logits[0, first:].float(), dim=-1)
    return sum(logprobs[i, token].item() for i, token in enumerate(tokens[first + 1 :]))


def loop_example(model: GPT, example: dict, style: str) -> tuple[list[float], list[int]]:
    enc = get_encoding()
    if style == "reference":
        context = enc.encode(example["ctx"])
        endings = [enc.encode(" " + e) for e in example["endings"]]
        return [loop_loglik(model, context + e, len(e)) for e in endings], [len(e) for e in endings]
    query = clean(f"{example['activity_label']}: {example['ctx_a']} {example['ctx_b'].capitalize()}")
    lls, chars = [], []
    for ending in example["endings"]:
        choice = clean(ending)
        context = enc.encode(query)
        continuation = enc.encode(query + " " + choice)[len(context) :]
        lls.append(loop_loglik(model, context + continuation, len(continuation)))
        chars.append(len(choice))
    return lls, chars


@pytest.mark.slow
def test_batched_scores_equal_a_plain_per_example_loop_in_both_styles(model, examples):
    batched = score_examples(model, examples, CPU, batch_size=16)  # all NUM_EXAMPLES
    for style in ("reference", "harness"):
        loop = [loop_example(model, example, style) for example in examples]
        loglik = np.array([lls for lls, _ in loop])
        norm = np.array([n for _, n in loop], dtype=np.float64)
        labels = np.array([example["label"] for example in examples])
        np.testing.assert_allclose(batched[style]["loglik"], loglik, rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(batched[style]["norm"], norm)
        # reference acc_norm: lowest mean per-token loss; harness acc_norm: highest loglik per character
        if style == "reference":
            acc_norm = np.mean((-loglik / norm).argmin(axis=1) == labels)
        else:
            acc_norm = np.mean((loglik / norm).argmax(axis=1) == labels)
        assert accuracies(batched[style]["loglik"], batched[style]["norm"], batched[style]["label"]) == (
            np.mean(loglik.argmax(axis=1) == labels),
            acc_norm,
        )
    enc = get_encoding()
    longer = sum(
        len(enc.encode(ex["ctx"] + " " + ending)) > SMALL["block_size"] + 1
        for ex in examples
        for ending in ex["endings"]
    )
    assert longer > 0  # some sequences exceed the context: the left-truncation path ran


def test_batch_size_and_fixed_shapes_do_not_change_scores(model, examples, batched):
    subset = examples[:24]
    again = score_examples(model, subset, CPU, batch_size=7, fixed_shapes=True)
    for style in ("reference", "harness"):
        np.testing.assert_allclose(again[style]["loglik"], batched[style]["loglik"][:24], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("style", ["reference", "harness"])
def test_evaluate_reports_each_style_from_its_scores(model, examples, batched, style):
    # one style alone (the trainer may ask for the reference style only); the other's keys are None
    result = evaluate_hellaswag(model, examples[:40], CPU, styles=(style,), batch_size=16)
    s = {k: v[:40] for k, v in batched[style].items()}
    mine, other = ("", "harness_") if style == "reference" else ("harness_", "")
    assert result[other + "acc"] is None and result[other + "acc_norm"] is None and result["count"] == 40
    assert result[mine + "acc"] == np.mean(s["loglik"].argmax(axis=1) == s["label"])
    assert result[mine + "acc_norm"] == np.mean((s["loglik"] / s["norm"]).argmax(axis=1) == s["label"])


def test_works_on_a_torch_compiled_model(model, examples, batched):
    # backend="eager" runs dynamo's graph capture without a C++ toolchain; fixed shapes turn on.
    compiled = torch.compile(model, backend="eager")
    again = score_examples(compiled, examples[:8], CPU, styles=("reference",), batch_size=16)
    np.testing.assert_allclose(again["reference"]["loglik"], batched["reference"]["loglik"][:8], rtol=1e-5, atol=1e-4)


# ---- 2 gloo processes == 1 ----------------------------------------------------------------------
def _rank_worker(rank: int, world_size: int, port: int, data_path: str, out_dir: str, limit: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    dist_info = runtime.setup_distributed("cpu")
    scores = score_examples(
        small_model(), load_examples(data_path, limit=limit, verify=False), dist_info, batch_size=16
    )
    np.savez(Path(out_dir) / f"rank{rank}.npz", **{style: s["loglik"] for style, s in scores.items()})
    runtime.teardown_distributed()  # barrier, then destroy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_same_numbers_as_one(tmp_path, hellaswag_val_path):
    limit = 30  # 2 styles x 30 x 4 = 240 rows in batches of 16: 15 batches, unequal shares
    context = mp.start_processes(
        _rank_worker,
        args=(2, free_port(), str(hellaswag_val_path), str(tmp_path), limit),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("2-process HellaSwag evaluation hung for 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    single = score_examples(
        small_model(), load_examples(hellaswag_val_path, limit=limit, verify=False), CPU, batch_size=16
    )
    for rank in range(2):
        saved = np.load(tmp_path / f"rank{rank}.npz")
        for style, s in single.items():
            # each row runs in the same batch whatever the world size, and the all-reduce adds
            # zeros: bit-identical scores on every rank, hence identical accuracies
            np.testing.assert_array_equal(saved[style], s["loglik"])
            assert accuracies(saved[style], s["norm"], s["label"]) == accuracies(s["loglik"], s["norm"], s["label"])


# ---- harness prompt construction on concrete strings ---------------------------------------------
def test_harness_preprocess_turns_title_into_a_sentence_break_and_drops_tags():
    assert (
        harness_preprocess("  Clean the sink [title] Rinse it. [step] Dry it.  ") == "Clean the sink. Rinse it. Dry it."
    )
    assert harness_preprocess("[header] How to bake [substeps] a cake") == " How to bake a cake"
    # one replace pass: three spaces become two, not one
    assert harness_preprocess("a   b") == "a  b"


def test_harness_query_uses_activity_label_and_capitalises_ctx_b():
    example = {
        "activity_label": "Making a cake",
        "ctx_a": "A woman mixes flour.",
        "ctx_b": "the Woman",
        "endings": ["x"] * 4,
    }
    # str.capitalize: first letter up, the rest down, as the harness does
    assert harness_query(example) == "Making a cake: A woman mixes flour. The woman"
    wikihow = {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to fix a tap [title] Turn off the water.",
        "ctx_b": "",
        "endings": ["x"] * 4,
    }
    assert harness_query(wikihow) == "Home and Garden: How to fix a tap. Turn off the water."


def test_harness_encode_pair_moves_trailing_spaces_to_the_continuation():
    enc = get_encoding()
    context, continuation = harness_encode_pair(enc, "The cat ", "sat.")
    assert context == enc.encode("The cat")
    assert continuation == enc.encode("The cat sat.")[len(context) :] == enc.encode(" sat.")


# ---- data: download, verification, clear errors ---------------------------------------------------
@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server serving tmp_path/www: a real download without the internet."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_sha256_and_writes_once(tmp_path, http_server, hellaswag_val_path):
    """The real download code against a local server. The fixture stands for the official file: its
    own sha256 is the expected one here; the pinned hash of the full file refuses it."""
    www, base = http_server
    data = hellaswag_val_path.read_bytes()
    expected = hashlib.sha256(data).hexdigest()
    (www / "hellaswag_val.jsonl").write_bytes(data)
    (www / "truncated.jsonl").write_bytes(data[:100_000])
    target = tmp_path / "cache" / "hellaswag_val.jsonl"

    with pytest.raises(ValueError, match="sha256.*nothing was written"):
        download(target, url=f"{base}/truncated.jsonl", expected_sha256=expected)
    with pytest.raises(ValueError, match="sha256.*nothing was written"):  # not the official 10,042 examples
        download(target, url=f"{base}/hellaswag_val.jsonl")
    assert not target.exists() and not list((tmp_path / "cache").glob("*"))

    assert download(target, url=f"{base}/hellaswag_val.jsonl", expected_sha256=expected) == target
    assert target.read_bytes() == data
    verify_sha256(target, expected)  # the check load_examples runs, on the file it wrote
    (www / "hellaswag_val.jsonl").unlink()
    assert download(target, url=f"{base}/hellaswag_val.jsonl", expected_sha256=expected) == target  # cached


def test_download_without_network_says_how_to_get_the_file(tmp_path):
    with pytest.raises(ConnectionError, match="--download-only"):
        download(tmp_path / "hellaswag_val.jsonl", url=f"http://127.0.0.1:{free_port()}/hellaswag_val.jsonl", timeout=5)
    assert not (tmp_path / "hellaswag_val.jsonl").exists()


def test_bad_data_files_give_one_line_errors(tmp_path, hellaswag_val_path):
    lines = hellaswag_val_path.read_text().splitlines(keepends=True)[:5]
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text("".join(lines[:2]) + lines[2][:40] + "\n" + "".join(lines[3:]))
    with pytest.raises(ValueError, match="line 3: not valid JSON"):
        load_examples(corrupt, verify=False)

    wrong_fields = tmp_path / "fields.jsonl"
    record = json.loads(lines[0])
    record["endings"] = record["endings"][:3]
    wrong_fields.write_text(lines[0] + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="line 2: 'endings' must be 4"):
        load_examples(wrong_fields, verify=False)

    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(lines))
    with pytest.raises(ValueError, match="sha256.*--no-verify"):
        load_examples(subset)
    assert len(load_examples(subset, verify=False)) == 5

    with pytest.raises(FileNotFoundError, match="--download-only"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=f"sha256.*{HELLASWAG_SHA256[:12]}"):  # the pinned hash of the full file
        load_examples(hellaswag_val_path)


# ---- the CLI --------------------------------------------------------------------------------------
def save_tiny_checkpoint(
    path: Path, step: int = 7, config: dict | None = None, weights_from: dict | None = None
) -> None:
    model = small_model()
    if weights_from is not None:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**weights_from))
    torch.save({"model": model.state_dict(), "model_config": config or asdict(model.config), "step": step}, path)


def test_cli_appends_one_result_line_per_run(tmp_path, hellaswag_val_path, model):
    ckpt = tmp_path / "model_final.pt"
    save_tiny_checkpoint(ckpt, step=7)
    cmd = [
        sys.executable,
        str(ROOT / "hellaswag.py"),
        "--checkpoint",
        str(ckpt),
        "--data",
        str(hellaswag_val_path),
        "--no-verify",
        "--limit",
        "20",
        "--log-dir",
        str(tmp_path / "log"),
        "--device",
        "cpu",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    summary = out.stdout.strip().splitlines()
    assert len(summary) == 1 and "reference acc" in summary[0] and "harness acc" in summary[0]
    assert "examples/s" in summary[0]
    # progress while it runs (tqdm on stderr, main rank): examples done and the rate
    assert "hellaswag: 100%" in out.stderr and "20/20" in out.stderr and "ex/s" in out.stderr, out.stderr

    expected = evaluate_hellaswag(model, load_examples(hellaswag_val_path, limit=20, verify=False), CPU)
    assert hellaswag.main(cmd[2:]) == 0  # the same run in-process appends a second line
    records = [json.loads(line) for line in (tmp_path / "log" / "hellaswag_results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert set(record) == {
            "checkpoint",
            "model",
            "step",
            "acc",
            "acc_norm",
            "harness_acc",
            "harness_acc_norm",
            "count",
            "seconds",
            "time",
        }
        assert record["checkpoint"] == str(ckpt) and record["model"] is None and record["step"] == 7
        assert record["count"] == 20 and record["seconds"] > 0
        for key in ("acc", "acc_norm", "harness_acc", "harness_acc_norm"):
            assert record[key] == expected[key]


def test_a_checkpoints_score_is_filed_in_its_own_run_folder(tmp_path, hellaswag_val_path, capsys):
    """log_fast/model_final.pt is scored into log_fast/, where `plot.py --log-dir log_fast` reads it,
    not into log/ (another run's folder); --log-dir still chooses; --hf models go to log/."""
    run_dir = tmp_path / "log_fast"
    run_dir.mkdir()
    save_tiny_checkpoint(run_dir / "model_final.pt", step=5)
    data = ["--data", str(hellaswag_val_path), "--no-verify", "--limit", "4", "--device", "cpu"]
    assert hellaswag.main(["--checkpoint", str(run_dir / "model_final.pt"), *data]) == 0
    assert capsys.readouterr().out.strip().endswith(str(run_dir / "hellaswag_results.jsonl"))
    (record,) = [json.loads(line) for line in (run_dir / "hellaswag_results.jsonl").read_text().splitlines()]
    assert record["checkpoint"] == str(run_dir / "model_final.pt") and record["step"] == 5
    assert (
        hellaswag.main(["--checkpoint", str(run_dir / "model_final.pt"), *data, "--log-dir", str(tmp_path / "chosen")])
        == 0
    )
    assert (tmp_path / "chosen" / "hellaswag_results.jsonl").is_file()
    assert len((run_dir / "hellaswag_results.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chosen", "log_fast"]  # no log/ made on the side
    assert checkpoint.results_dir("", "gpt2", "") == Path("log")
    assert checkpoint.results_dir("", "", "") == Path("log")  # of log/model_final.pt


def test_cli_errors_are_one_line(tmp_path, hellaswag_val_path, capsys):
    data = [
        "--data",
        str(hellaswag_val_path),
        "--no-verify",
        "--limit",
        "4",
        "--device",
        "cpu",
        "--log-dir",
        str(tmp_path / "log"),
    ]

    wrong_shape = tmp_path / "wrong_shape.pt"
    save_tiny_checkpoint(wrong_shape, config={**SMALL, "n_embd": 32}, weights_from=SMALL)
    assert cli.run_main(hellaswag.main, ["--checkpoint", str(wrong_shape), *data]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{cli.script_name()}: error:") and "do not fit" in err and len(err.splitlines()) == 1

    assert cli.run_main(hellaswag.main, ["--checkpoint", str(tmp_path / "nope.pt"), *data]) == 2
    assert "not found" in capsys.readouterr().err

    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(hellaswag_val_path.read_text().splitlines(keepends=True)[:4]))
    good = tmp_path / "good.pt"
    save_tiny_checkpoint(good)
    args = ["--checkpoint", str(good), "--data", str(subset), "--device", "cpu", "--log-dir", str(tmp_path / "log")]
    assert cli.run_main(hellaswag.main, args) == 2
    assert "sha256" in capsys.readouterr().err
    assert hellaswag.main([*args, "--no-verify"]) == 0
    assert "4 examples" in capsys.readouterr().out

    assert (
        cli.run_main(
            hellaswag.main, ["--checkpoint", str(good), "--data", str(tmp_path / "missing.jsonl"), "--device", "cpu"]
        )
        == 2
    )
    assert "--download-only" in capsys.readouterr().err
    # only the one run that succeeded wrote a result
    assert len((tmp_path / "log" / "hellaswag_results.jsonl").read_text().splitlines()) == 1
