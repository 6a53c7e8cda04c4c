"""CORE (core_eval.py, core.py): the reference's rules on concrete inputs, each task type's answer
against a direct forward of the model, batching and ranks, the data files' checks, the CLI.

The model is a small random GPT (2 layers, width 16) with a 64-token context, so the 10-shot prompts
of the hand-written examples in tests/data/core/ are longer than the context and get cropped.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
import core
import core_eval
import runtime
from core_eval import LANGUAGE_MODELING, MULTIPLE_CHOICE, SCHEMA, FileSpec, Task
from model import GPT, GPTConfig
from scoring import plan_batches, score_all
from tokenizer import EOT_TOKEN, get_encoding

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "data" / "core"
SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 64}
CPU = runtime.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
# One task of each kind over the fixtures, with the shots and delimiters of real CORE tasks.
KINDS = {
    MULTIPLE_CHOICE: Task("mc", "multiple_choice.jsonl", MULTIPLE_CHOICE, 10, "\nAnswer: ", 25),
    SCHEMA: Task("schema", "schema.jsonl", SCHEMA, 0, " ", 50),
    LANGUAGE_MODELING: Task("lm", "language_modeling.jsonl", LANGUAGE_MODELING, 10, " ", 0),
}
# Which fixture stands for each real task's file (same kind, same format) in the CLI tests.
FIXTURE_OF_KIND = {kind: FIXTURES / task.file for kind, task in KINDS.items()}


def small_model(seed: int = 1234) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return small_model()


def fixture_suite(shots: dict[str, int] | None = None) -> core_eval.Suite:
    """The three fixture files as a suite, each its own task (all its 12-13 examples, shuffled)."""
    tasks = []
    for kind, task in KINDS.items():
        task = replace(task, shots=(shots or {}).get(kind, task.shots))
        examples = core_eval.task_examples(task, core_eval.load_examples(FIXTURES / task.file, kind), 0)
        tasks.append((task, examples))
    return core_eval.Suite(tasks, {}, 0)


# ---- the reference's rules, on concrete inputs ------------------------------------------------------
def test_examples_are_shuffled_with_1337_then_cut():
    items = [{"i": i} for i in range(40)]
    expected = list(items)
    random.Random(1337).shuffle(expected)
    assert core_eval.task_examples(KINDS[SCHEMA], items, 0) == expected
    assert core_eval.task_examples(KINDS[SCHEMA], items, 15) == expected[:15]
    assert items == [{"i": i} for i in range(40)]  # the caller's list is left as it was


def test_shots_are_drawn_per_example_from_the_others_with_seed_1234_plus_i():
    for n, shots in ((11, 10), (40, 10), (230, 3), (500, 10)):
        for i in (0, 1, n // 2, n - 1):
            others = [j for j in range(n) if j != i]
            expected = random.Random(1234 + i).sample(others, shots)
            got = core_eval.shot_indices(n, i, shots)
            assert got == expected and i not in got
            assert core_eval.shot_indices(n, i, shots) == got  # deterministic
    assert core_eval.shot_indices(100, 3, 0) == []


def test_prompts_are_rendered_as_the_reference_template_does():
    mc_shot = {"query": "Q1?", "choices": ["x", "y"], "gold": 1}
    item = {"query": "Q2?", "choices": ["a", "b"], "gold": 0}
    assert core_eval.render_prompts(KINDS[MULTIPLE_CHOICE], item, [mc_shot, mc_shot]) == [
        "Q1?\nAnswer: y\n\nQ1?\nAnswer: y\n\nQ2?\nAnswer: a",
        "Q1?\nAnswer: y\n\nQ1?\nAnswer: y\n\nQ2?\nAnswer: b",
    ]
    schema_shot = {"context_options": ["A did it", "B did it"], "continuation": "well.", "gold": 0}
    item = {"context_options": ["Ann came because Ann", "Ann came because Bo"], "continuation": "asked.", "gold": 1}
    assert core_eval.render_prompts(KINDS[SCHEMA], item, [schema_shot]) == [
        "A did it well.\n\nAnn came because Ann asked.",
        "A did it well.\n\nAnn came because Bo asked.",
    ]
    # language_modeling: contexts trimmed; the prompt without the continuation stripped (its trailing
    # delimiter space too); the one with it not
    lm_task = replace(KINDS[LANGUAGE_MODELING], delimiter="\nAnswer: ")
    shot = {"context": "  Two plus two equals ", "continuation": "four"}
    item = {"context": "The sky is ", "continuation": "blue"}
    assert core_eval.render_prompts(lm_task, item, [shot]) == [
        "Two plus two equals\nAnswer: four\n\nThe sky is\nAnswer:",
        "Two plus two equals\nAnswer: four\n\nThe sky is\nAnswer: blue",
    ]
    assert core_eval.render_prompts(KINDS[LANGUAGE_MODELING], item, []) == ["The sky is", "The sky is blue"]


def test_scored_tokens_are_those_the_options_do_not_share():
    enc = get_encoding()
    bos = [EOT_TOKEN]
    # multiple choice: all choices begin " the birds began to sing": those tokens are context, not scored
    prompts = ["Then the birds began to sing.", "Then the birds began to sing loudly."]
    seqs, n = core_eval.example_sequences(KINDS[MULTIPLE_CHOICE], [enc.encode(p) for p in prompts])
    assert seqs == [bos + enc.encode(p) for p in prompts]
    assert n == [len(enc.encode(".")), len(enc.encode(" loudly."))]
    # a choice that the other begins with has no tokens of its own
    _, n = core_eval.example_sequences(
        KINDS[MULTIPLE_CHOICE], [enc.encode("It was raining"), enc.encode("It was raining hard")]
    )
    assert n == [0, 1]
    # schema: the options differ in the middle, the common end is scored, the same count for each
    _, n = core_eval.example_sequences(
        KINDS[SCHEMA], [enc.encode("because Ann was late."), enc.encode("because Bo was late.")]
    )
    assert n == [len(enc.encode(" was late.")), len(enc.encode(" was late."))]
    # language modeling: what the continuation adds to the stripped prompt (" blue", the space included)
    seqs, n = core_eval.example_sequences(
        KINDS[LANGUAGE_MODELING], [enc.encode("The sky is"), enc.encode("The sky is blue")]
    )
    assert seqs == [bos + enc.encode("The sky is blue")] and n == [len(enc.encode(" blue"))] == [1]


def test_long_prompts_keep_their_last_block_size_tokens():
    tokens = list(range(100))
    assert core_eval.crop(tokens, 5, 64) == tokens[-64:]  # the continuation's 5 tokens stay the last 5
    assert core_eval.crop(tokens[:30], 5, 64) == tokens[:30]
    with pytest.raises(ValueError, match="does not fit the model's 64-token context"):
        core_eval.crop(tokens, 64, 64)
    suite = fixture_suite()
    built = core_eval.build(suite, SMALL["block_size"])
    assert max(len(s) for s in built.sequences) == SMALL["block_size"]  # the 10-shot prompts were cut
    assert core_eval.build(suite, SMALL["block_size"]) is built  # tokenized once per context length


# ---- each task type's answer against a direct forward of the model ---------------------------------
@torch.no_grad()
def direct_answer(model: GPT, task: Task, examples: list[dict], i: int) -> tuple[bool, list[float]]:
    """Example i scored the reference's way, written out: the whole (cropped) sequence in one forward,
    per-token cross-entropy, the scored span's mean (multiple choice / schema) or argmax match (LM)."""
    enc, block = get_encoding(), model.config.block_size
    shots = [
        examples[j] for j in random.Random(1234 + i).sample([j for j in range(len(examples)) if j != i], task.shots)
    ]
    seqs = [[EOT_TOKEN, *enc.encode(p)] for p in core_eval.render_prompts(task, examples[i], shots)]
    if task.kind == LANGUAGE_MODELING:
        spans, seqs = [(len(seqs[0]), len(seqs[1]))], seqs[1:]
    elif task.kind == MULTIPLE_CHOICE:
        start = next(k for k in range(len(seqs[0]) + 1) if k == min(map(len, seqs)) or len({s[k] for s in seqs}) > 1)
        spans = [(start, len(s)) for s in seqs]
    else:
        end = next(
            k for k in range(min(map(len, seqs)) + 1) if k == min(map(len, seqs)) or len({s[-1 - k] for s in seqs}) > 1
        )
        spans = [(len(s) - end, len(s)) for s in seqs]
    mean_losses, all_greedy = [], True
    for (start, end), seq in zip(spans, seqs):
        cut = max(0, len(seq) - block)
        seq, start, end = seq[cut:], start - cut, end - cut
        logits, _ = model(torch.tensor(seq)[None])  # (1, T, vocab): position t predicts token t + 1
        losses = F.cross_entropy(logits[0, :-1], torch.tensor(seq[1:]), reduction="none")  # (T - 1,)
        mean_losses.append(losses[start - 1 : end - 1].mean().item())  # nan for an empty span
        all_greedy &= bool((logits[0, start - 1 : end - 1].argmax(-1) == torch.tensor(seq[start:end])).all())
    if task.kind == LANGUAGE_MODELING:
        return all_greedy, mean_losses
    return mean_losses.index(min(mean_losses)) == examples[i]["gold"], mean_losses


def test_each_task_type_scores_as_a_direct_forward(model):
    suite = fixture_suite()
    result = core_eval.evaluate_core(model, suite, CPU, batch_size=8)
    built = core_eval.build(suite, SMALL["block_size"])
    scores = score_all(model, built.sequences, built.n_scored, CPU)
    for (task, examples), starts in zip(suite.tasks, built.starts):
        direct = [direct_answer(model, task, examples, i) for i in range(len(examples))]
        got = core_eval.correct(
            task, examples, scores.logprob, scores.greedy, np.asarray(built.n_scored, float), starts
        )
        assert got.tolist() == [ok for ok, _ in direct], task.label
        assert result["tasks"][task.label]["accuracy"] == np.mean([ok for ok, _ in direct])
        if task.kind != LANGUAGE_MODELING:  # the mean losses themselves (nan where a span is empty)
            with np.errstate(invalid="ignore"):
                mine = -scores.logprob / np.asarray(built.n_scored)
            theirs = [loss for _, losses in direct for loss in losses]
            np.testing.assert_allclose(mine[starts[0] : starts[-1]], theirs, rtol=1e-5, atol=1e-5)
    assert result["tasks"]["mc"]["centered"] == pytest.approx((result["tasks"]["mc"]["accuracy"] - 0.25) / 0.75)
    assert result["core"] is None  # 3 made-up tasks, not the 22
    assert result["core_partial"] == np.mean([t["centered"] for t in result["tasks"].values()])


def test_a_model_that_knows_the_answers_scores_them_all():
    """Greedy exact match can succeed: a model trained (a few hundred Adam steps) on the LM fixture's
    own sequences repeats every continuation, and the task's accuracy is 1."""
    suite = fixture_suite(shots={LANGUAGE_MODELING: 0})
    task, examples = suite.tasks[2]
    suite = core_eval.Suite([(task, examples)], {}, 0)
    built = core_eval.build(suite, SMALL["block_size"])
    model = small_model(seed=0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    T = max(map(len, built.sequences))
    inputs, targets = (
        torch.zeros(len(built.sequences), T - 1, dtype=torch.long),
        torch.full((len(built.sequences), T - 1), -1),
    )
    for r, (seq, n) in enumerate(zip(built.sequences, built.n_scored)):
        inputs[r, : len(seq) - 1] = torch.as_tensor(seq[:-1])
        targets[r, len(seq) - 1 - n : len(seq) - 1] = torch.as_tensor(seq[-n:])  # the continuation only
    scored = (targets.flatten() >= 0).nonzero().squeeze(1)  # train the output layer only where it is scored
    for _ in range(300):
        logits, _ = model(inputs, positions=scored)
        loss = F.cross_entropy(logits, targets.flatten()[scored])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = core_eval.evaluate_core(model.eval(), suite, CPU)
    assert result["tasks"]["lm"]["accuracy"] == 1.0 and result["tasks"]["lm"]["centered"] == 1.0


# ---- one scorer: batched = one at a time, compiled = eager, 2 ranks = 1 -----------------------------
def test_batched_scores_equal_one_sequence_at_a_time(model):
    built = core_eval.build(fixture_suite(), SMALL["block_size"])
    one = score_all(model, built.sequences, built.n_scored, CPU, batch_size=1)
    for kwargs in ({"batch_size": 16}, {"batch_size": 7, "max_tokens": 200}, {"batch_size": 5, "fixed_shapes": True}):
        batched = score_all(model, built.sequences, built.n_scored, CPU, **kwargs)
        np.testing.assert_allclose(batched.logprob, one.logprob, rtol=1e-5, atol=1e-4)
        assert batched.greedy.tolist() == one.greedy.tolist()
    assert one.greedy[np.asarray(built.n_scored) == 0].all()  # nothing to score: vacuously greedy


def test_a_token_budget_bounds_each_forward():
    # lengths (cropped to block_size + 1 = 65) -> inputs of T = length - 1; 128 tokens: 2 rows of 64, 4 of 29
    batches = plan_batches([30, 65, 10, 30, 65, 30], batch_size=16, max_tokens=128, fixed_shapes=False, block_size=64)
    assert [(rows, R, T) for rows, R, T in batches] == [([1, 4], 2, 64), ([0, 3, 5, 2], 4, 29)]
    # fixed shapes: lengths rounded up to a multiple of 32, every batch padded to its full row count
    assert plan_batches([30, 20], 16, 128, True, 64) == [([0, 1], 4, 32)]
    assert plan_batches([30, 20], 16, None, True, 64) == [([0, 1], 16, 32)]


def test_works_on_a_torch_compiled_model(model):
    suite = fixture_suite()
    eager = core_eval.evaluate_core(model, suite, CPU)
    # backend="eager" runs dynamo's graph capture without a C++ toolchain; fixed shapes turn on
    compiled = core_eval.evaluate_core(torch.compile(model, backend="eager"), suite, CPU)
    assert compiled["tasks"] == eager["tasks"]


def fixture_data_dir(root: Path) -> Path:
    """A --data-dir holding every real task file's path, each filled with the fixture of its kind."""
    return core_eval.stand_in_data_dir(root, FIXTURES)


def save_tiny_checkpoint(path: Path, step: int = 3) -> None:
    m = small_model()
    torch.save({"model": m.state_dict(), "model_config": asdict(m.config), "step": step}, path)


def test_two_torchrun_gloo_ranks_give_the_same_result_as_one_process(tmp_path):
    data, ckpt = fixture_data_dir(tmp_path / "data"), tmp_path / "model_final.pt"
    save_tiny_checkpoint(ckpt)
    args = [
        "core.py",
        "--checkpoint",
        str(ckpt),
        "--data-dir",
        str(data),
        "--no-verify",
        "--device",
        "cpu",
        "--tasks",
        "copa,winograd,lambada_openai,arc_easy,jeopardy",
        "--batch-size",
        "4",
    ]
    for name, launcher in (
        ("one", [sys.executable]),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
    ):
        out = subprocess.run(
            [*launcher, *args, "--log-dir", str(tmp_path / name)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    (one,), (two,) = [
        [json.loads(line) for line in (tmp_path / name / "core_results.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["tasks"] == one["tasks"] and two["core_partial"] == one["core_partial"]  # bit for bit
    assert len(one["tasks"]) == 5 and one["core"] is None


# ---- the data files --------------------------------------------------------------------------------
def specs_of(paths: dict[str, Path]) -> dict[str, FileSpec]:
    """Pins computed from the fixtures, standing in for DATA_FILES' pins of the real files."""
    out = {}
    for name, path in paths.items():
        data = path.read_bytes()
        out[name] = FileSpec(
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), len(data), hashlib.sha256(data).hexdigest()
        )
    return out


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server serving tmp_path/www: real downloads without the internet."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_download_checks_each_file_and_writes_it_once(tmp_path, http_server):
    www, url = http_server
    names = {
        "world_knowledge/arc_easy.jsonl": FIXTURES / "multiple_choice.jsonl",
        "language_understanding/winogrande.jsonl": FIXTURES / "schema.jsonl",
    }
    specs = specs_of(names)
    for name, path in names.items():
        (www / name).parent.mkdir(parents=True, exist_ok=True)
        (www / name).write_bytes(path.read_bytes()[:-40])  # a truncated copy upstream
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="arc_easy.jsonl is .* bytes, not .*nothing was written"):
        core_eval.download(cache, list(names), url, specs=specs)
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))

    for name, path in names.items():
        shutil.copyfile(path, www / name)
    assert core_eval.download(cache, list(names), url, specs=specs) == {}
    for name, path in names.items():
        assert (cache / name).read_bytes() == path.read_bytes()
    shutil.rmtree(www / "world_knowledge")  # gone upstream: the cached copy is used, not fetched
    assert core_eval.download(cache, list(names), url, specs=specs) == {}
    # a cached file changed since: refused, naming it and the fix
    (cache / "world_knowledge/arc_easy.jsonl").write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(
        ValueError, match="arc_easy.jsonl is .* bytes, not .*delete it and get the files with `uv run core.py"
    ):
        core_eval.download(cache, list(names), url, specs=specs)


def test_without_network_the_files_are_reported_not_raised(tmp_path):
    failed = core_eval.download(tmp_path, ["commonsense_reasoning/copa.jsonl"], closed_port_url(), timeout=5)
    assert (
        list(failed) == ["commonsense_reasoning/copa.jsonl"]
        and "could not download" in failed["commonsense_reasoning/copa.jsonl"]
    )
    assert not any(tmp_path.iterdir())


def test_bad_task_files_give_one_line_errors(tmp_path):
    lines = (FIXTURES / "multiple_choice.jsonl").read_text().splitlines(keepends=True)
    torn = tmp_path / "torn.jsonl"
    torn.write_text("".join(lines[:3]) + lines[3][:30])  # a download cut mid-line
    with pytest.raises(ValueError, match="torn.jsonl line 4: not valid JSON .*torn or corrupt; delete it"):
        core_eval.load_examples(torn, MULTIPLE_CHOICE)
    with pytest.raises(ValueError, match="line 1: field 'context' missing.*not a language_modeling example"):
        core_eval.load_examples(FIXTURES / "multiple_choice.jsonl", LANGUAGE_MODELING)
    bad_gold = tmp_path / "gold.jsonl"
    bad_gold.write_text(json.dumps({"query": "Q", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(ValueError, match="'gold' 2 is not an index of the 2 options"):
        core_eval.load_examples(bad_gold, MULTIPLE_CHOICE)
    with pytest.raises(FileNotFoundError, match="missing.jsonl not found: get the files with `uv run core.py"):
        core_eval.load_examples(tmp_path / "missing.jsonl", SCHEMA)
    good = FIXTURES / "schema.jsonl"
    (spec,) = specs_of({"s": good}).values()
    assert len(core_eval.load_examples(good, SCHEMA, verify=spec)) == 12
    for wrong, message in (
        (replace(spec, size=spec.size + 1), "bytes, not"),
        (replace(spec, sha256="0" * 64), "sha256"),
        (FileSpec("0" * 40), "not llm-foundry's file"),
    ):
        with pytest.raises(ValueError, match=f"schema.jsonl is .*{message}.*delete it"):
            core_eval.load_examples(good, SCHEMA, verify=wrong)


# ---- the CLI -----------------------------------------------------------------------------------------
def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "core.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_prints_every_task_and_appends_one_result_per_run(tmp_path, model):
    data, run_dir = fixture_data_dir(tmp_path / "data"), tmp_path / "log_tiny"
    run_dir.mkdir()
    save_tiny_checkpoint(run_dir / "model_final.pt", step=9)
    args = [
        "--checkpoint",
        str(run_dir / "model_final.pt"),
        "--data-dir",
        str(data),
        "--no-verify",
        "--device",
        "cpu",
        "--max-per-task",
        "11",
        "--data-url",
        closed_port_url(),
    ]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr
    assert core.main(args) == 0  # in-process: a second line
    records = [json.loads(line) for line in (run_dir / "core_results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["tasks"] == records[1]["tasks"]
    record = records[0]
    assert record["step"] == 9 and record["max_per_task"] == 11 and record["missing"] == []
    assert list(record["tasks"]) == [t.label for t in core_eval.TASKS]
    assert all(t["count"] == 11 for t in record["tasks"].values()) and record["count"] == 22 * 11
    assert (
        record["core"] == np.mean([t["centered"] for t in record["tasks"].values()]) and record["core_partial"] is None
    )
    # the baselines: commonsense_qa 20%, boolq 62%, bigbench_language_identification 9.1% (DCLM v1)
    for label, b in (("commonsense_qa", 20), ("boolq", 62), ("bigbench_language_identification", 9.1), ("jeopardy", 0)):
        t = record["tasks"][label]
        assert t["centered"] == pytest.approx((t["accuracy"] - b / 100) / (1 - b / 100), abs=1e-12)
    lines = out.stdout.splitlines()
    assert len(lines) == 1 + 22 + 2 and lines[-2] == f"CORE {record['core']:.4f} (all 22 tasks)"
    assert "examples/s" in lines[-1] and str(run_dir / "core_results.jsonl") in lines[-1]


def test_missing_files_fail_or_give_a_partial_core_that_says_so(tmp_path):
    data = fixture_data_dir(tmp_path / "data")
    (data / "reading_comprehension/squad.jsonl").unlink()
    (data / "reading_comprehension/coqa.jsonl").unlink()
    save_tiny_checkpoint(tmp_path / "model_final.pt")
    args = [
        "--checkpoint",
        str(tmp_path / "model_final.pt"),
        "--data-dir",
        str(data),
        "--no-verify",
        "--device",
        "cpu",
        "--max-per-task",
        "11",
        "--data-url",
        closed_port_url(),
    ]
    out = run_cli(args, tmp_path)  # no network: one line naming the file and the ways out
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "coqa.jsonl" in out.stderr and "--download-only" in out.stderr and "--allow-missing" in out.stderr
    assert not (tmp_path / "core_results.jsonl").exists()

    out = run_cli([*args, "--allow-missing"], tmp_path)
    assert out.returncode == 0, out.stderr
    (record,) = [json.loads(line) for line in (tmp_path / "core_results.jsonl").read_text().splitlines()]
    assert record["core"] is None and record["missing"] == ["coqa", "squad"] and len(record["tasks"]) == 20
    assert record["core_partial"] == np.mean([t["centered"] for t in record["tasks"].values()])
    assert "squad" in out.stdout and "MISSING" in out.stdout
    assert (
        f"CORE-PARTIAL {record['core_partial']:.4f} over 20 of 22 tasks (missing: squad, coqa): NOT CORE" in out.stdout
    )


def test_download_only_with_every_file_cached_needs_no_network(tmp_path, capsys):
    data = fixture_data_dir(tmp_path / "data")
    offline = ["--data-dir", str(data), "--data-url", closed_port_url()]
    assert core.main(["--download-only", "--no-verify", *offline]) == 0
    assert f"CORE task files ready in {data}" in capsys.readouterr().out
    # checked against the real pins, the hand-made files are refused: one line naming one of them
    out = run_cli(["--download-only", *offline], tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert re.search(
        r"commonsense_qa.jsonl is [\d,]+ bytes, not 258,861: delete it and get the files with "
        r"`uv run core.py --download-only",
        out.stderr,
    ), out.stderr


def test_download_only_without_network_says_what_to_do_instead(tmp_path):
    """Offline, --download-only itself cannot be the fix, nor --allow-missing (nothing is evaluated)."""
    out = run_cli(["--download-only", "--data-dir", str(tmp_path / "data"), "--data-url", closed_port_url()], tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "could not download" in out.stderr and "on a machine with network" in out.stderr
    assert "--allow-missing" not in out.stderr and "Run `uv run core.py --download-only" not in out.stderr


def test_core_in_training_names_the_trainers_flags(tmp_path):
    data = fixture_data_dir(tmp_path / "data")
    with pytest.raises(ValueError, match="use --core-max-per-task 0 \\(all\\) or at least 11"):
        core_eval.load_suite(data, max_per_task=5, verify=False, per_task_flag="--core-max-per-task")
    with pytest.raises(ValueError, match=f"none of the CORE task files are in {tmp_path / 'empty'}: get the files "):
        core_eval.load_suite(tmp_path / "empty", verify=False, allow_missing=True)


def test_cli_refuses_bad_flags_in_one_line(capsys):
    for args, message in (
        (["--tasks", "copa,nope"], "--tasks: unknown CORE task nope: choose from hellaswag_zeroshot, "),
        (["--max-per-task", "5"], "--max-per-task 5: use 0 (all) or at least 11"),
        (["--checkpoint", "x.pt", "--hf", "gpt2"], "give --checkpoint or --hf, not both"),
    ):
        assert cli.run_main(core.main, args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
