"""HellaSwag: the validation file and its two scoring styles (scored by scoring.py, the one batched scorer).

Used by `hellaswag.py` (a checkpoint or a Hugging Face model, both styles) and by the trainer
(every --hellaswag-every steps, reference style). Nothing here prints, parses flags or picks a device.

    uv run python -c "import hellaswag_eval as h; \\
        print(len(h.load_examples('tests/data/hellaswag_val_300.jsonl', verify=False)))"

Each example has a context and 4 endings; a model "answers" by which ending it finds most likely.
Two ways of turning that into text and numbers are in use, and they give different accuracies:

- reference (build-nanogpt's, the numbers this project quotes): context = `ctx`, each ending
  " " + ending. acc: the ending with the highest total log-likelihood; acc_norm: the ending with the
  lowest mean per-token loss (log-likelihood / number of ending tokens).
- harness (EleutherAI lm-evaluation-harness's `hellaswag` task, the numbers papers and leaderboards
  quote): context = cleaned "activity_label: ctx_a Ctx_b", endings cleaned too, continuation " " +
  ending. acc: highest total log-likelihood; acc_norm: highest log-likelihood / ending length in
  characters.

Both styles score a (context, ending) pair the same way: the model reads context + ending and we sum
log p(token) over the ending's tokens. Sequences longer than the model's context (none of the 10,042
for GPT-2's 1024; some for a small block_size) keep their last block_size + 1 tokens, i.e. the context
is truncated from the left, exactly as lm-evaluation-harness does for both styles.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

import cli
import fileio
import runtime
from cli import UserError
from scoring import score_all
from tokenizer import EOT_TOKEN, get_encoding

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# sha256 of the official validation split (10,042 lines, 12,246,618 bytes).
HELLASWAG_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
DEFAULT_DATA_PATH = cli.DEFAULT_HELLASWAG_DATA  # the trainer's --hellaswag-data default too
NUM_ENDINGS = 4
STYLES = ("reference", "harness")
_REQUIRED_FIELDS = {"ctx": str, "ctx_a": str, "ctx_b": str, "activity_label": str, "endings": list, "label": int}
_HOW_TO_GET = (
    "get it with `uv run hellaswag.py --download-only` (on a machine with network), or pass --data PATH to a copy"
)


# ---- the data file ----------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str = HELLASWAG_SHA256) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(
            f"{path} has sha256 {actual[:12]}..., not the official HellaSwag validation file's {expected[:12]}...: "
            "delete it and download again (`uv run hellaswag.py --download-only`), or skip the check with "
            "--no-verify if it is a subset on purpose"
        )


def download(
    path: str | Path = DEFAULT_DATA_PATH,
    url: str = HELLASWAG_URL,
    expected_sha256: str | None = HELLASWAG_SHA256,
    timeout: float = 60.0,
) -> Path:
    """Fetch the validation file into `path` unless it is there already. The bytes are checked
    against the sha256 before anything is written, and written atomically: a failed or partial
    download never leaves a file behind."""
    path = Path(path)
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"could not download {url} ({reason}): no network here? Run `uv run hellaswag.py --download-only` "
            f"on a machine with network and copy the file to {path}, or pass --data PATH to a copy"
        ) from None
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise UserError(
                f"downloaded {url} ({len(data):,} bytes) has sha256 {actual[:12]}..., "
                f"expected {expected_sha256[:12]}...: "
                "the download is corrupt or the upstream file changed; nothing was written, try again"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_bytes(path, data)
    return path


def load_examples(path: str | Path, limit: int | None = None, verify: bool = True) -> list[dict]:
    """The examples of a HellaSwag JSONL file (the first `limit` if given), each checked for the
    fields the two styles need. `verify` checks the whole file's sha256 (turn it off for subsets)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file {path} not found: {_HOW_TO_GET}")
    if verify:
        verify_sha256(path)
    return fileio.read_examples(path, _check_example, "HellaSwag", _HOW_TO_GET, limit)


def _check_example(example) -> str | None:
    if not isinstance(example, dict):
        return "expected a JSON object"
    for name, kind in _REQUIRED_FIELDS.items():
        if not isinstance(example.get(name), kind) or isinstance(example.get(name), bool):
            return f"field {name!r} missing or not a {kind.__name__}"
    endings = example["endings"]
    if len(endings) != NUM_ENDINGS or not all(isinstance(e, str) and e for e in endings):
        return f"'endings' must be {NUM_ENDINGS} non-empty strings"
    if not 0 <= example["label"] < NUM_ENDINGS:
        return f"'label' {example['label']} is not in 0..{NUM_ENDINGS - 1}"
    return None


# ---- rendering: text -> (context tokens, continuation tokens) ---------------------------------
def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness `lm_eval/tasks/hellaswag/utils.py::preprocess`: WikiHow's " [title]"
    becomes a sentence break, other bracketed tags ("[header]", "[step]", ...) go, double spaces
    collapse once (a plain replace, not a loop)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def harness_query(example: dict) -> str:
    """The harness prompt (utils.py::process_docs): "activity_label: ctx_a Ctx_b", cleaned.
    str.capitalize() also lower-cases the rest of ctx_b, as the harness does."""
    return harness_preprocess(example["activity_label"] + ": " + example["ctx_a"] + " " + example["ctx_b"].capitalize())


def harness_choices(example: dict) -> list[str]:
    return [harness_preprocess(ending) for ending in example["endings"]]


def harness_encode_pair(enc, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness `_encode_pair` (lm_eval/models/huggingface.py; TemplateLM in
    lm_eval/api/model.py in later versions): trailing spaces of the context move to the
    continuation; the continuation's tokens are those of encode(context + continuation) after the
    first len(encode(context)) tokens. No BOS token: for GPT-2 the harness adds none unless the
    context is empty (then it uses <|endoftext|>), and HellaSwag contexts never are."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [EOT_TOKEN], enc.encode_ordinary(continuation)
    whole = enc.encode_ordinary(context + continuation)
    context_tokens = enc.encode_ordinary(context)
    return context_tokens, whole[len(context_tokens) :]


def render(example: dict, style: str, enc=None) -> tuple[list[list[int]], list[int], list[int]]:
    """One example in one style -> (the 4 token sequences context + continuation, the number of
    continuation tokens of each, the normaliser of each style's acc_norm: token counts for
    reference, ending lengths in characters for harness)."""
    enc = enc or get_encoding()
    if style == "reference":
        # build-nanogpt: tokens = encode(ctx) + encode(" " + ending), scored over the ending.
        context = enc.encode_ordinary(example["ctx"])
        endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
        return [context + e for e in endings], [len(e) for e in endings], [len(e) for e in endings]
    if style == "harness":
        # multiple_choice requests are (query, target_delimiter + choice) with target_delimiter " "
        # (lm_eval/api/task.py construct_requests); acc_norm divides by len(choice), the cleaned
        # ending without that space (task.py process_results: completion_len = len(choice)).
        query, choices = harness_query(example), harness_choices(example)
        pairs = [harness_encode_pair(enc, query, " " + choice) for choice in choices]
        return [c + e for c, e in pairs], [len(e) for _, e in pairs], [len(choice) for choice in choices]
    raise UserError(f"unknown HellaSwag style {style!r}: use one of {STYLES}")


# ---- scoring: one pool of rows for both styles, through the shared scorer ----------------------
def score_examples(
    model,
    examples: list[dict],
    dist_info: runtime.DistInfo,
    autocast=None,
    styles=STYLES,
    batch_size: int | None = None,
    fixed_shapes: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per style: "loglik" (N, 4) summed log-likelihood of each ending, "norm" (N, 4) its acc_norm
    divisor, "label" (N,). Every rank scores its share of the rows (both styles in one pool of
    batches, scoring.score_all); every rank returns all scores."""
    enc = get_encoding()
    sequences, n_scored, norms = [], [], {}
    for style in styles:
        style_norms = []
        for example in examples:
            seqs, ns, norm = render(example, style, enc)
            sequences += seqs
            n_scored += ns
            style_norms.append(norm)
        norms[style] = np.asarray(style_norms, dtype=np.float64)
    scores = score_all(model, sequences, n_scored, dist_info, autocast, batch_size, fixed_shapes, progress=progress)
    scores = scores.logprob.reshape(len(styles), len(examples), NUM_ENDINGS)
    labels = np.asarray([example["label"] for example in examples])
    return {style: {"loglik": scores[s], "norm": norms[style], "label": labels} for s, style in enumerate(styles)}


def accuracies(loglik: np.ndarray, norm: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(acc, acc_norm): argmax of log-likelihood, and of log-likelihood / norm. For the reference
    style (norm = token count) the latter is the argmin of the mean per-token loss."""
    acc = float(np.mean(loglik.argmax(axis=1) == labels))
    acc_norm = float(np.mean((loglik / norm).argmax(axis=1) == labels))
    return acc, acc_norm


def evaluate_hellaswag(
    model,
    examples: list[dict],
    dist_info: runtime.DistInfo,
    autocast=None,
    *,
    styles=STYLES,
    batch_size: int | None = None,
    fixed_shapes: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """HellaSwag accuracies of `model` (a GPT, possibly torch.compile'd; called as model(idx) ->
    (logits, loss)) on `examples`, split across ranks; every rank returns the same dict:
    acc, acc_norm (reference style), harness_acc, harness_acc_norm (None when the style is not
    asked for), count. batch_size: rows per forward (default scoring.DEFAULT_BATCH_ROWS for the device);
    progress(rows): called after each batch this rank scores (rows = one ending of one example in one style).
    The model's train/eval mode is left as it is (GPT has no dropout)."""
    unknown = set(styles) - set(STYLES)
    if unknown or not styles:
        raise UserError(f"styles {tuple(styles)}: choose from {STYLES}")
    if not examples:
        raise UserError("no HellaSwag examples to evaluate")
    scored = score_examples(model, examples, dist_info, autocast, tuple(styles), batch_size, fixed_shapes, progress)
    result = {"acc": None, "acc_norm": None, "harness_acc": None, "harness_acc_norm": None, "count": len(examples)}
    for style, s in scored.items():
        acc, acc_norm = accuracies(s["loglik"], s["norm"], s["label"])
        prefix = "" if style == "reference" else "harness_"
        result[prefix + "acc"], result[prefix + "acc_norm"] = acc, acc_norm
    return result
