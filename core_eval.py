"""CORE: DCLM's mean centered accuracy over 22 in-context-learning tasks, as nanochat computes it.

Used by `core.py` (a checkpoint or a Hugging Face model) and, through `load_suite` + `evaluate_core`,
by anything holding a model in memory. Nothing here prints, parses flags or picks a device.

    uv run python -c "import core_eval as c; \\
        print(c.render_prompts(c.TASKS[3], {'query': 'Question: 2+2?', 'choices': ['3', '4'], 'gold': 1}, []))"

The definition is nanochat's (karpathy/nanochat `nanochat/core_eval.py` + `scripts/base_eval.py`, the
reference of the "time to GPT-2" leaderboard; OpenAI's GPT-2 there: 124M 0.1139, 355M 0.1849, 774M
0.2146, 1.5B 0.2565), written again here:

- the 22 tasks of `TASKS` (DCLM's eval/mmlu_and_lowvar.yaml without MMLU), each with its few-shot
  count and continuation delimiter; their files are llm-foundry's scripts/eval/local_data/*.jsonl.
- each task's examples are shuffled with random.Random(1337), then cut to --max-per-task;
  example i draws its shots with random.Random(1234 + i).sample() from the others of that list.
- prompts: the shots, each "<its context><delimiter><its answer>\\n\\n", then the example's own
  context and delimiter (`render_prompts`); every prompt is tokenized whole, after <|endoftext|>
  (GPT-2's BOS). multiple_choice: one prompt per choice, the scored tokens those after the prompts'
  common prefix; schema: one per context option, scored the common suffix; language_modeling: the
  scored tokens are what the continuation adds to the prompt without it (contexts trimmed).
- a prompt longer than the model's context keeps its last block_size tokens (the position that
  would predict past its end is fed but never read).
- multiple_choice and schema: correct when the gold option has the lowest mean loss over its scored
  tokens (ties: the first); language_modeling: when every scored token is the greedy argmax.
- centered = (acc - b) / (1 - b), b the random baseline of DCLM's eval_meta_data_v1.csv (the values
  the reference's eval bundle holds; DCLM changed commonsense_qa, agi_eval_lsat_ar and
  bigbench_language_identification in Sept 2025); CORE = the mean of the 22 centered accuracies.

How the reference differs from DCLM's own evaluation (llm-foundry's ICL code, which DCLM ran):
- shots: DCLM draws them from one random.Random(1234) stream over the file in its order, nanochat
  from Random(1234 + i) over the shuffled list (so --max-per-task also changes which shots are drawn);
  DCLM evaluates every example, in file order.
- layout: DCLM joins examples with "\\n", nanochat with "\\n\\n"; DCLM strips whitespace from every
  field and right-strips contexts, nanochat only trims language_modeling contexts.
- tokens: DCLM tokenizes context and answer separately and concatenates them, with no BOS for GPT-2;
  nanochat tokenizes each prompt whole after a BOS, so a token can straddle the boundary, and a
  multiple_choice prefix shared by all the choices (e.g. the same first word) is not scored.
- length: DCLM cuts the context from the left to fit its 2048-token window around the answer;
  nanochat keeps the last max_seq_len tokens (1024 for GPT-2; here the model's block_size).
- baselines: both the v1 values above (DCLM's later eval_meta_data.csv has commonsense_qa 40.3,
  agi_eval_lsat_ar 25, bigbench_language_identification 25).
Where this code can differ from the reference: batched, right-padded forwards and float32 sums in
another order move losses by ~1e-6, which can flip an exact tie; the output layer at the scored tokens
runs in float32 (the reference's logits are bf16 on a GPU: ~1e-2 in a log-probability); tiktoken vs
Hugging Face tokenizers (the same GPT-2 BPE) and argmax ties are the other places. On a GPU the blocks
still run under bf16 autocast (8 bits of mantissa), so a checkpoint's scores there differ from a CPU's
by far more than 1e-6 (scoring.py); on one device, reruns and any world size give the same bits.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import cli
import fileio
from cli import UserError
from tokenizer import EOT_TOKEN, get_encoding, usable_cores

if TYPE_CHECKING:
    import runtime

MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING = "multiple_choice", "schema", "language_modeling"
ANSWER = "\nAnswer: "  # the delimiter DCLM's yaml gives the question-answer tasks; " " elsewhere


@dataclass(frozen=True)
class Task:
    label: str
    file: str  # under llm-foundry's scripts/eval/local_data/
    kind: str  # MULTIPLE_CHOICE, SCHEMA or LANGUAGE_MODELING
    shots: int
    delimiter: str  # between a context and its continuation
    baseline: float  # random-guess accuracy in percent (DCLM eval_meta_data_v1.csv)


# DCLM eval/mmlu_and_lowvar.yaml (mlfoundations/dclm) minus mmlu_fewshot, in its order; baselines from
# eval/eval_meta_data_v1.csv at mlfoundations/dclm 361714bd (= eval_meta_data.csv of its first commit).
TASKS: tuple[Task, ...] = (
    Task("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", MULTIPLE_CHOICE, 0, " ", 25),
    Task("jeopardy", "world_knowledge/jeopardy_all.jsonl", LANGUAGE_MODELING, 10, ANSWER, 0),
    Task("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", LANGUAGE_MODELING, 10, " ", 0),
    Task("arc_easy", "world_knowledge/arc_easy.jsonl", MULTIPLE_CHOICE, 10, ANSWER, 25),
    Task("arc_challenge", "world_knowledge/arc_challenge.jsonl", MULTIPLE_CHOICE, 10, ANSWER, 25),
    Task("copa", "commonsense_reasoning/copa.jsonl", MULTIPLE_CHOICE, 0, " ", 50),
    Task("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", MULTIPLE_CHOICE, 10, " ", 20),
    Task("piqa", "commonsense_reasoning/piqa.jsonl", MULTIPLE_CHOICE, 10, ANSWER, 50),
    Task("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", MULTIPLE_CHOICE, 0, " ", 25),
    Task("lambada_openai", "language_understanding/lambada_openai.jsonl", LANGUAGE_MODELING, 0, " ", 0),
    Task("hellaswag", "language_understanding/hellaswag.jsonl", MULTIPLE_CHOICE, 10, " ", 25),
    Task("winograd", "language_understanding/winograd_wsc.jsonl", SCHEMA, 0, " ", 50),
    Task("winogrande", "language_understanding/winogrande.jsonl", SCHEMA, 0, " ", 50),
    Task(
        "bigbench_dyck_languages",
        "symbolic_problem_solving/bigbench_dyck_languages.jsonl",
        LANGUAGE_MODELING,
        10,
        " ",
        0,
    ),
    Task("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", MULTIPLE_CHOICE, 3, " ", 20),
    Task(
        "bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", LANGUAGE_MODELING, 10, " ", 0
    ),
    Task("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", LANGUAGE_MODELING, 10, " ", 0),
    Task(
        "bigbench_repeat_copy_logic",
        "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl",
        LANGUAGE_MODELING,
        10,
        " ",
        0,
    ),
    Task("squad", "reading_comprehension/squad.jsonl", LANGUAGE_MODELING, 10, " ", 0),
    Task("coqa", "reading_comprehension/coqa.jsonl", LANGUAGE_MODELING, 0, " ", 0),
    Task("boolq", "reading_comprehension/boolq.jsonl", MULTIPLE_CHOICE, 10, ANSWER, 62),
    Task(
        "bigbench_language_identification",
        "language_understanding/bigbench_language_identification.jsonl",
        MULTIPLE_CHOICE,
        10,
        " ",
        9.1,
    ),
)
TASKS_BY_LABEL = {task.label: task for task in TASKS}
MAX_SHOTS = max(task.shots for task in TASKS)


@dataclass(frozen=True)
class FileSpec:
    """What a task file must be: its git blob id at the pinned commit (sha1 of "blob <size>\\0" + bytes,
    what the commit's tree names), and its size and sha256 where we hold a copy to compute them from."""

    git_blob: str
    size: int | None = None
    sha256: str | None = None


# mosaicml/llm-foundry at its 2025-07-21 head; the 21 files (hellaswag serves two tasks) last changed there 2023-11-20.
LLM_FOUNDRY_COMMIT = "8c8dd48f72168c5d51e2f7b151595892a8fba43d"
DATA_URL = f"https://raw.githubusercontent.com/mosaicml/llm-foundry/{LLM_FOUNDRY_COMMIT}/scripts/eval/local_data"
DEFAULT_DATA_DIR = cli.DEFAULT_CORE_DATA
DATA_FILES: dict[str, FileSpec] = {
    "commonsense_reasoning/commonsense_qa.jsonl": FileSpec(
        "f1cc16a88b05ab0934aab2ec2d02a6869e6e5520",
        258861,
        "2771f63f8127c0725b1f6b0ef2cd2ef6469168ae5875fc8d276b25b4f32c8c1a",
    ),
    "commonsense_reasoning/copa.jsonl": FileSpec(
        "b22f96e08ae9d0e97e1ae58f67b6425c77ef200a",
        14627,
        "595dca44dec54c849490bd403a3e24a29e3b944065783222ebb0eb1a55298846",
    ),
    "commonsense_reasoning/openbook_qa.jsonl": FileSpec(
        "a8aff255a64cbc72a85252acf00df25a315686c2",
        88043,
        "adb2e5c7f8db810ddad4d6b2bf53dcc86dcc545499f7aafcaf42a8e179476c09",
    ),
    "commonsense_reasoning/piqa.jsonl": FileSpec(
        "a9992adfdefde366fe7ccff871f5aa62449a09cf",
        533992,
        "d2870e73aec5154df3faf259b7700876e11608eebdf69e9d6667435673dbe4e0",
    ),
    "language_understanding/bigbench_language_identification.jsonl": FileSpec(
        "1f132fbbb12a67ce267b7b92b458175632c265f3",
        3940808,
        "80c98d8e7ab8213513d1643886229c05c40a6837353b07c19ac7bd860668954e",
    ),
    # Rebuilt byte for byte (same git blob) from rowanz/hellaswag's validation file: each example as
    # {"query", "choices", "gold"} with lm-evaluation-harness's cleaning, json.dumps(ensure_ascii=False).
    "language_understanding/hellaswag.jsonl": FileSpec(
        "448321079fdc140bd8566b16b24eda9ceacd3501",
        8258653,
        "52a31d32b14dff7713a705be664cbeff77eb66edcf7f8b0a5e9408633929b448",
    ),
    "language_understanding/lambada_openai.jsonl": FileSpec(
        "4da02dd53b9e7385871d06ab855471d77b2f7dda",
        1895241,
        "411bfbe5b9054346b6a19299c0242670adbefb9162efd958593cbc0290b8c9dc",
    ),
    "language_understanding/winograd_wsc.jsonl": FileSpec(
        "762fe030ac6938ecba438c47a04057247c6ab891",
        60523,
        "746336c27cd2e39a554cb1b8b4869d0f1ae2577ac5bfe799842d26bca5a5bf5e",
    ),
    "language_understanding/winogrande.jsonl": FileSpec(
        "316e87ae4659f0c402b0f00551fdec83ab0a0986",
        312369,
        "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7",
    ),
    "reading_comprehension/boolq.jsonl": FileSpec(
        "f42083a58713d00ef4600118cfdf79618c269190",
        2210395,
        "454ff101e614370bb1807fe7ebbda6fdb57e794b9662cc1ccae211bf1ff626c8",
    ),
    # No copy to hash here: checked by the git blob id alone (it covers the size and every byte too).
    "reading_comprehension/coqa.jsonl": FileSpec("028bd4e51326cc43f8394987ae47fbb271aeba9d"),
    "reading_comprehension/squad.jsonl": FileSpec("dc733b8f58ec666c53fd946198c434b819a00680"),
    "symbolic_problem_solving/agi_eval_lsat_ar.jsonl": FileSpec(
        "d663b427ba310d3f877f09a6830198ca7c856189",
        219517,
        "9ffd73480b51746c11627e56239f8b87035eb255cb92c3a58fd64e2e4b65fb56",
    ),
    "symbolic_problem_solving/bigbench_cs_algorithms.jsonl": FileSpec(
        "7ecee0f270f3de8b6558da14ae02181f3d950a40",
        235435,
        "8485683a8c7e7e6c9fc6ca3cc81140fd85edb27f34406a6736d1539cf7ebcb3a",
    ),
    "symbolic_problem_solving/bigbench_dyck_languages.jsonl": FileSpec(
        "27a4ac2b3b18716add92f4ecd62475c4f8d77768",
        198916,
        "106ba9ac7507c7ab385c5e59c49cd57aa83025abf080d9b2a2661c0d6c6dbcc5",
    ),
    "symbolic_problem_solving/bigbench_operators.jsonl": FileSpec(
        "a982dc4f962725c9dc4abb07d3cc333c99959290",
        35375,
        "41e2964ad619c49edd97c22b2c50f922a0241255d906a754bf81a20f4f66b85f",
    ),
    "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl": FileSpec(
        "86621f10e7124ed6f3a61fb91493c1256c008f60",
        7158,
        "8febd2c0080a15680cd17f92bfa30d87abcfac021e646e55d0b8ad69f0cfa767",
    ),
    "world_knowledge/arc_challenge.jsonl": FileSpec(
        "ce66b8dcfb4bac892a404a0dda8b4e8ed0f84b89",
        365606,
        "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636",
    ),
    "world_knowledge/arc_easy.jsonl": FileSpec(
        "b5fd1bf87a24246a6be67230b721541688f5c349",
        636665,
        "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5",
    ),
    "world_knowledge/bigbench_qa_wikidata.jsonl": FileSpec(
        "5e1be72797ba082fd4f6efa42f7d759d2d23339a",
        1639702,
        "bb0d22727cb25beffb022c8e8c0c3e1159c8b3c7bd7284603c0d6491f8616265",
    ),
    "world_knowledge/jeopardy_all.jsonl": FileSpec(
        "2f771918dbc8b68550df204171b14d2648b5d494",
        364582,
        "187e7f270a440c63d6cf11a57459fdc7e0bce889338225e42cc88e24ee13d52e",
    ),
}


def how_to_get(data_dir: str | Path) -> str:
    """The fix for a missing or damaged task file under `data_dir`, whichever flag named that folder
    (core.py's --data-dir, the trainer's --core-data)."""
    return f"get the files with `uv run core.py --download-only --data-dir {data_dir}` on a machine with network"


# The fields each kind of example needs, and their types.
_FIELDS = {
    MULTIPLE_CHOICE: {"query": str, "choices": list, "gold": int},
    SCHEMA: {"context_options": list, "continuation": str, "gold": int},
    LANGUAGE_MODELING: {"context": str, "continuation": str},
}
# Tokens (rows x length) per forward: the (rows, T, 50257) logits are what fills memory (float32 on a
# CPU: 2048 tokens = 0.4 GB, about a HellaSwag batch; bf16 on a GPU: 32768 = 3.3 GB).
MAX_BATCH_TOKENS = {"cuda": 32768, "cpu": 2048}


# ---- the data files ----------------------------------------------------------------------------
def select_tasks(labels: list[str] | tuple[str, ...] | None) -> tuple[Task, ...]:
    """The tasks named in `labels` (in TASKS' order), all 22 for None; ValueError for an unknown name."""
    if not labels:
        return TASKS
    unknown = [label for label in labels if label not in TASKS_BY_LABEL]
    if unknown:
        raise UserError(f"unknown CORE task {', '.join(unknown)}: choose from {', '.join(TASKS_BY_LABEL)}")
    return tuple(task for task in TASKS if task.label in labels)


def check_file(path: Path, data: bytes, spec: FileSpec, fix: str) -> None:
    """ValueError (one line, naming the file and `fix`) unless `data` is the pinned file."""
    problem = None
    if spec.size is not None and len(data) != spec.size:
        problem = f"{len(data):,} bytes, not {spec.size:,}"
    elif spec.sha256 is not None and hashlib.sha256(data).hexdigest() != spec.sha256:
        problem = f"sha256 {hashlib.sha256(data).hexdigest()[:12]}..., not {spec.sha256[:12]}..."
    elif hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() != spec.git_blob:
        problem = f"not llm-foundry's file (git blob {spec.git_blob[:12]}...)"
    if problem:
        raise UserError(f"{path} is {problem}: {fix}")


def download(
    data_dir: str | Path,
    files: list[str],
    url: str = DATA_URL,
    timeout: float = 60.0,
    verify: bool = True,
    specs: dict[str, FileSpec] | None = None,
) -> dict[str, str]:
    """Fetch each of `files` (paths under local_data/, keys of `specs`, default DATA_FILES) missing
    from `data_dir`, checked before it is written (atomically: a failed download leaves nothing). A
    file already there is checked (unless not `verify`), not fetched. Returns {file: why} for the
    files it could not download; raises ValueError for a corrupt one."""
    specs, failed = specs or DATA_FILES, {}
    for name in files:
        path = Path(data_dir) / name
        if path.is_file():
            if verify:
                check_file(path, path.read_bytes(), specs[name], f"delete it and {how_to_get(data_dir)}")
            continue
        try:
            with urllib.request.urlopen(f"{url}/{name}", timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as e:
            failed[name] = f"could not download {url}/{name} ({getattr(e, 'reason', e)})"
            continue
        check_file(
            path,
            data,
            specs[name],
            "the download is corrupt or the upstream file changed; nothing was written, try again",
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fileio.atomic_write_bytes(path, data)
    return failed


def load_examples(path: str | Path, kind: str, verify: FileSpec | None = None) -> list[dict]:
    """The examples of one task file, each checked for the fields its kind needs (`verify`: the
    pinned file it must be, checked first)."""
    path = Path(path)
    fix = how_to_get(path.parent.parent)  # task files are <data dir>/<category>/<name>.jsonl
    if not path.is_file():
        raise FileNotFoundError(f"CORE task file {path} not found: {fix}, or copy the file there")
    if verify is not None:
        check_file(path, path.read_bytes(), verify, f"delete it and {fix}")
    return fileio.read_examples(path, lambda example: _check_example(example, kind), kind, fix)


def _check_example(example, kind: str) -> str | None:
    if not isinstance(example, dict):
        return "expected a JSON object"
    for name, kind_of in _FIELDS[kind].items():
        if not isinstance(example.get(name), kind_of) or isinstance(example.get(name), bool):
            return f"field {name!r} missing or not a {kind_of.__name__}"
    if kind != LANGUAGE_MODELING:
        options = example["choices" if kind == MULTIPLE_CHOICE else "context_options"]
        if len(options) < 2 or not all(isinstance(o, str) for o in options):
            return "the options must be 2 or more strings"
        if not 0 <= example["gold"] < len(options):
            return f"'gold' {example['gold']} is not an index of the {len(options)} options"
    return None


# ---- the definition: examples, shots, prompts, tokens -----------------------------------------
def task_examples(task: Task, examples: list[dict], max_per_task: int) -> list[dict]:
    """The reference's subset: shuffled with Random(1337), then the first max_per_task (0: all)."""
    examples = list(examples)
    random.Random(1337).shuffle(examples)
    return examples[:max_per_task] if max_per_task > 0 else examples


def shot_indices(n: int, i: int, shots: int) -> list[int]:
    """The shots of example i of n: Random(1234 + i).sample(the other n - 1 indices, shots). sample()
    picks positions from the population's length alone, so sampling range(n - 1) and skipping i is
    the same draw as sampling the list [0..n) without i, without building that list n times."""
    if shots == 0:
        return []
    return [j + (j >= i) for j in random.Random(1234 + i).sample(range(n - 1), shots)]


def render_prompts(task: Task, item: dict, shots: list[dict]) -> list[str]:
    """The prompt texts of one example: one per choice (multiple_choice) or context option (schema);
    for language_modeling [the prompt without the continuation, stripped; the prompt with it]."""
    d = task.delimiter
    if task.kind == MULTIPLE_CHOICE:
        prefix = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.kind == SCHEMA:
        prefix = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{option}{d}{item['continuation']}" for option in item["context_options"]]
    # The contexts are trimmed (some end in spaces); stripping the prompt without the continuation
    # drops the delimiter's trailing space, so the scored tokens start with " answer", as one token.
    prefix = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    without = f"{prefix}{item['context'].strip()}{d}"
    return [without.strip(), without + item["continuation"]]


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """How many leading (or trailing) tokens all of `seqs` share (a bisection on list-slice equality:
    C-speed comparisons, where a token-by-token loop over 10-shot prompts took seconds per task)."""
    if from_end:
        seqs = [s[::-1] for s in seqs]
    lo, hi = 0, min(len(s) for s in seqs)  # the first lo tokens agree; more than hi cannot
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if all(s[:mid] == seqs[0][:mid] for s in seqs[1:]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def example_sequences(task: Task, tokens: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """One example's token sequences ([<|endoftext|>] + each prompt's `tokens`, GPT-2's BOS first) and
    how many of their last tokens are scored."""
    seqs = [[EOT_TOKEN, *t] for t in tokens]
    if task.kind == MULTIPLE_CHOICE:
        start = common_length(seqs)
        return seqs, [len(s) - start for s in seqs]
    if task.kind == SCHEMA:
        return seqs, [common_length(seqs, from_end=True)] * len(seqs)
    without, with_continuation = seqs
    if with_continuation[: len(without)] != without or len(with_continuation) == len(without):
        raise UserError(
            f"{task.label}: a prompt's tokens without its continuation are not a prefix of the tokens "
            "with it: not a language_modeling example this definition can score"
        )
    return [with_continuation], [len(with_continuation) - len(without)]


def crop(tokens: list[int], n_scored: int, block_size: int) -> list[int]:
    """The reference's cut for a model of `block_size` positions: the last block_size tokens."""
    if n_scored >= block_size:
        raise UserError(f"a continuation of {n_scored} tokens does not fit the model's {block_size}-token context")
    return tokens[-block_size:]


# ---- a suite: the examples of the chosen tasks, tokenized once per context length ----------------
@dataclass
class Suite:
    """What `evaluate_core` scores: each task with its examples (shuffled and cut as the reference
    does), the tasks left out because their file is missing ({label: why}), and the token sequences
    built from them, kept per block_size (an in-training evaluation tokenizes once)."""

    tasks: list[tuple[Task, list[dict]]]
    missing: dict[str, str]
    max_per_task: int
    _built: dict = field(default_factory=dict, repr=False)

    @property
    def complete(self) -> bool:
        """All 22 tasks, so the mean of their centered accuracies is CORE (with --max-per-task too)."""
        return not self.missing and len(self.tasks) == len(TASKS)


def load_suite(
    data_dir: str | Path = DEFAULT_DATA_DIR,
    tasks: list[str] | tuple[str, ...] | None = None,
    max_per_task: int = 0,
    verify: bool = True,
    allow_missing: bool = False,
    per_task_flag: str = "--max-per-task",
) -> Suite:
    """Read the chosen tasks' files from `data_dir` (each checked against its pin unless not `verify`).
    A missing file is an error, or with `allow_missing` a task left out and named in `missing`.
    `per_task_flag`: the flag that set max_per_task, named in the error when it is too small."""
    chosen, loaded, missing, files = select_tasks(tasks), [], {}, {}
    for task in chosen:
        path = Path(data_dir) / task.file
        if not path.is_file() and allow_missing:
            missing[task.label] = f"{path} not found"
            continue
        if task.file not in files:  # hellaswag's file serves two tasks: read and checked once
            files[task.file] = load_examples(path, task.kind, DATA_FILES.get(task.file) if verify else None)
        examples = task_examples(task, files[task.file], max_per_task)
        if len(examples) <= task.shots:
            raise UserError(
                f"{task.label}: {len(examples)} examples cannot give each one {task.shots} shots from the "
                f"others: use {per_task_flag} 0 (all) or at least {MAX_SHOTS + 1}"
            )
        loaded.append((task, examples))
    if not loaded:
        raise UserError(f"none of the CORE task files are in {data_dir}: {how_to_get(data_dir)}")
    return Suite(loaded, missing, max_per_task)


@dataclass(frozen=True)
class Built:
    """The suite as one pool of rows: sequences (int32 tokens, cropped to the context), scored-token
    counts, and per task the row where each of its examples starts (len(examples) + 1 offsets)."""

    sequences: list[np.ndarray]
    n_scored: list[int]
    starts: list[np.ndarray]


def build(suite: Suite, block_size: int) -> Built:
    """Every example's prompts as token rows for a model of `block_size` positions, built once per
    block_size and kept on the suite (the full suite is ~10^8 tokens: int32 arrays, not lists)."""
    if block_size not in suite._built:
        sequences, n_scored, starts = [], [], []
        for task, examples in suite.tasks:
            offsets = [len(sequences)]
            for tokens in tokenize(task, examples):
                seqs, ns = example_sequences(task, tokens)
                sequences += [np.asarray(crop(t, n, block_size), dtype=np.int32) for t, n in zip(seqs, ns)]
                n_scored += ns
                offsets.append(len(sequences))
            starts.append(np.asarray(offsets))
        suite._built[block_size] = Built(sequences, n_scored, starts)
    return suite._built[block_size]


def tokenize(task: Task, examples: list[dict], chunk: int = 512):
    """Yield, per example, the tokens of each of its prompts (shots drawn, prompts rendered), encoded
    `chunk` examples per batch: tiktoken spreads a batch over the cores (a call per example spent more
    time starting threads than encoding), and a chunk's token lists stay small. The cores: this
    process's share of its node (every rank of a torchrun tokenizes: 8 ranks each taking every core
    would run 8 threads per core)."""
    enc = get_encoding()
    threads = usable_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    for lo in range(0, len(examples), chunk):
        prompts = [
            render_prompts(task, examples[i], [examples[j] for j in shot_indices(len(examples), i, task.shots)])
            for i in range(lo, min(lo + chunk, len(examples)))
        ]
        flat = iter(enc.encode_ordinary_batch([p for ps in prompts for p in ps], num_threads=threads))
        yield from ([next(flat) for _ in ps] for ps in prompts)


# ---- scores -> accuracies -> CORE -------------------------------------------------------------
def correct(
    task: Task, examples: list[dict], logprob: np.ndarray, greedy: np.ndarray, n_scored: np.ndarray, starts: np.ndarray
) -> np.ndarray:
    """(len(examples),) bool. multiple_choice / schema: the gold option has the lowest mean loss over
    its scored tokens (`lowest`); language_modeling: every scored token was the greedy pick."""
    if task.kind == LANGUAGE_MODELING:
        return greedy[starts[:-1]]
    with np.errstate(invalid="ignore"):
        mean_loss = -logprob / n_scored  # (rows,); nan for an option with no tokens of its own
    return np.array(
        [lowest(mean_loss[lo:hi]) == item["gold"] for item, lo, hi in zip(examples, starts[:-1], starts[1:])]
    )


def lowest(mean_losses: np.ndarray) -> int:
    """The option the reference picks: mean_losses.index(min(mean_losses)), the first of equals. An
    option whose tokens are all in the prefix every choice shares (4 piqa examples: one choice begins
    the other) has the mean of no losses, nan; min() keeps a nan that comes first and skips one that
    comes later, since every comparison with nan is false."""
    if np.isnan(mean_losses[0]):
        return 0
    return int(np.nanargmin(mean_losses))


def centered(accuracy: float, baseline: float) -> float:
    """DCLM's centering: 0 at random guessing (baseline in percent), 1 at perfect."""
    return (accuracy - 0.01 * baseline) / (1.0 - 0.01 * baseline)


def evaluate_core(
    model,
    suite: Suite,
    dist_info: runtime.DistInfo,
    autocast=None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    fixed_shapes: bool = False,
) -> dict:
    """CORE of `model` (a GPT, possibly DDP-wrapped or torch.compile'd: then `fixed_shapes`, see
    scoring.score_sequences) on `suite`, split across ranks;
    every rank returns the same dict:
      tasks: {label: {accuracy, centered, count, shots, kind}} in TASKS' order,
      core: the mean centered accuracy when the suite is complete (all 22 tasks), else None,
      core_partial: that mean over the tasks evaluated when it is not, else None,
      missing: {label: why} of tasks whose file was missing, count: examples, rows: sequences scored.
    batch_size: rows per forward (scoring.DEFAULT_BATCH_ROWS), max_tokens: rows x length per forward
    (MAX_BATCH_TOKENS); progress(rows): after each of this rank's forwards."""
    from scoring import score_all, unwrap  # torch: imported to score, not when core.py parses its flags

    device = dist_info.device
    built = build(suite, unwrap(model).config.block_size)
    max_tokens = max_tokens or MAX_BATCH_TOKENS.get(device.type, MAX_BATCH_TOKENS["cuda"])
    scores = score_all(
        model,
        built.sequences,
        built.n_scored,
        dist_info,
        autocast,
        batch_size,
        max_tokens=max_tokens,
        progress=progress,
        fixed_shapes=fixed_shapes,
    )
    n_scored = np.asarray(built.n_scored, dtype=np.float64)
    tasks = {}
    for (task, examples), starts in zip(suite.tasks, built.starts):
        accuracy = float(np.mean(correct(task, examples, scores.logprob, scores.greedy, n_scored, starts)))
        tasks[task.label] = {
            "accuracy": accuracy,
            "centered": centered(accuracy, task.baseline),
            "count": len(examples),
            "shots": task.shots,
            "kind": task.kind,
        }
    mean = float(np.mean([t["centered"] for t in tasks.values()]))
    return {
        "tasks": tasks,
        "core": mean if suite.complete else None,
        "core_partial": None if suite.complete else mean,
        "missing": dict(suite.missing),
        "count": sum(t["count"] for t in tasks.values()),
        "rows": len(built.sequences),
    }


def summary_lines(result: dict) -> list[str]:
    """A table of the tasks (accuracy, centered) and the CORE line; a partial CORE says so."""
    lines = [f"{'task':<34} {'shots':>5}  {'type':<17} {'examples':>8}  {'accuracy':>8}  {'centered':>8}"]
    for label, t in result["tasks"].items():
        lines.append(
            f"{label:<34} {t['shots']:>5}  {t['kind']:<17} {t['count']:>8,}  "
            f"{t['accuracy']:>8.4f}  {t['centered']:>8.4f}"
        )
    for label, why in result["missing"].items():
        lines.append(
            f"{label:<34} {TASKS_BY_LABEL[label].shots:>5}  {TASKS_BY_LABEL[label].kind:<17} {'MISSING':>8}  ({why})"
        )
    if result["core"] is not None:
        lines.append(f"CORE {result['core']:.4f} (all 22 tasks)")
        return lines
    not_asked = [t.label for t in TASKS if t.label not in result["tasks"] and t.label not in result["missing"]]
    parts = [f"missing: {', '.join(result['missing'])}"] if result["missing"] else []
    if not_asked:
        parts.append(
            f"not asked for: {', '.join(not_asked)}" if len(not_asked) <= 4 else f"{len(not_asked)} not asked for"
        )
    lines.append(
        f"CORE-PARTIAL {result['core_partial']:.4f} over {len(result['tasks'])} of 22 tasks ({'; '.join(parts)}): "
        "NOT CORE, which needs all 22"
    )
    return lines


def stand_in_data_dir(root: str | Path, fixtures: str | Path) -> Path:
    """A --data-dir holding every task's file name, each a copy of `fixtures`/<kind>.jsonl (a file in
    the task's format): the code path and its speed without the real data (tests, the GPU check).
    Scores on it mean nothing; load it with verify=False."""
    root = Path(root)
    for task in TASKS:
        path = root / task.file
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(fixtures) / f"{task.kind}.jsonl", path)
    return root
