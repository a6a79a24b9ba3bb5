"""Token corpora for training SAEs and extracting their features.

A corpus is a list of documents (token-id lists) packed into fixed-length windows of
`context_size` tokens, the way SAE training data is usually prepared: each document starts with
the model's BOS token (when it uses one), documents are concatenated, and the stream is cut into
windows. A window is the whole context fed to the model; feature examples store it whole.

Sources (`--corpus`):

* `task` (default): the task's own distribution. For a zoo model and its own built-in task
  (`induction`, `ioi`), the zoo's training sequences, whole, with the zoo's loss mask (the
  induction sequences include the held-out periods); another built-in task is generated afresh
  with many prompts (another seed than the task itself); a JSONL task contributes its clean and
  corrupt prompts, repeated until the corpus has `n_tokens`.
* a text file (`.txt`): one document a line;
* a JSONL file: one document a line, `{"text": "..."}` or `{"tokens": [ids...]}`.

A file is read once, up to `n_tokens` tokens.

Errors name the file, the line and the field.
"""

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Int

from workbench.errors import BadInput
from workbench.hashing import sha256_json
from workbench.models.base import LoadedModel
from workbench.tasks import Task

TASK_CORPUS_SEED = 1  # built-in tasks use seed 0 for their prompts


@dataclass(frozen=True)
class Corpus:
    """Fixed-length token windows and where they came from."""

    name: str
    windows: Int[torch.Tensor, "n_windows context"]
    # where next-token loss counts ([n_windows, context - 1]); None: every position
    loss_mask: Bool[torch.Tensor, "n_windows prediction"] | None = None

    @property
    def context_size(self) -> int:
        return int(self.windows.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.windows.numel())

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256(self.windows.numpy().astype("<i8").tobytes()).hexdigest()
        return sha256_json({"name": self.name, "windows": digest})

    def batches(self, batch_size: int) -> Iterator[tuple[int, Int[torch.Tensor, "batch context"]]]:
        """(index of the first window, windows) in order; the model sees one batch at a time."""
        for start in range(0, len(self.windows), batch_size):
            yield start, self.windows[start : start + batch_size]


def load_corpus(
    spec: str, loaded: LoadedModel, task: Task, *, n_tokens: int, context_size: int | None = None
) -> Corpus:
    ctx = context_size or min(int(loaded.model.cfg.n_ctx), 128)
    n_ctx = int(loaded.model.cfg.n_ctx)
    if ctx < 2 or ctx > n_ctx:
        raise BadInput(f"--context-size {ctx}: must be between 2 and the model's n_ctx ({n_ctx})")
    zoo = _zoo_corpus(loaded, task, n_tokens) if spec == "task" else None
    if zoo is not None:
        return zoo
    if spec == "task":
        documents = _task_documents(loaded, task, n_tokens)
        name = f"task:{task.name}"
    else:
        path = Path(spec).expanduser()
        documents = _file_documents(path, loaded)
        name = str(path.resolve())
    windows = pack(documents, ctx, n_tokens, loaded, cycle=spec == "task")
    if len(windows) == 0:
        raise BadInput(f"corpus {spec}: fewer than {ctx} tokens, not one window of context")
    return Corpus(name=name, windows=windows)


def pack(
    documents: list[list[int]],
    context_size: int,
    n_tokens: int,
    loaded: LoadedModel,
    *,
    cycle: bool = False,
) -> Int[torch.Tensor, "n_windows context"]:
    """Concatenate documents (BOS first when the model uses one) and cut into windows of at most
    `n_tokens` tokens in all; with `cycle`, go through the documents again until there are."""
    bos = [int(loaded.bos_token_id)] if loaded.prepend_bos and loaded.bos_token_id else []
    stream: list[int] = []
    n_windows = max(1, n_tokens // context_size)
    total = n_windows * context_size
    while len(stream) < total:
        before = len(stream)
        for doc in documents:
            ids = doc if (not bos or (doc and doc[0] == bos[0])) else bos + doc
            stream.extend(ids)
            if len(stream) >= total:
                break
        if len(stream) == before or not cycle:
            break
    usable = (min(len(stream), total) // context_size) * context_size
    return torch.tensor(stream[:usable], dtype=torch.long, device="cpu").reshape(-1, context_size)


def _task_documents(loaded: LoadedModel, task: Task, n_tokens: int) -> list[list[int]]:
    from workbench.tasks import builtin

    if task.source.startswith("builtin:") and task.name in builtin.BUILTIN_TASKS:
        prompt_len = max(len(p.clean_tokens) for p in task.pairs)
        n_prompts = max(16, n_tokens // (2 * prompt_len) + 1)
        fresh = builtin.BUILTIN_TASKS[task.name](loaded, n_prompts=n_prompts, seed=TASK_CORPUS_SEED)
        pairs = fresh.pairs
    else:
        pairs = task.pairs
    return [doc for p in pairs for doc in (p.clean_tokens, p.corrupt_tokens)]


def _zoo_corpus(loaded: LoadedModel, task: Task, n_tokens: int) -> Corpus | None:
    """The task's own training distribution where it has one (a built-in task on the zoo
    model trained for it): whole training sequences, not packed, with their loss mask."""
    from workbench.tasks import training_corpus

    found = training_corpus(task, loaded, n_tokens=n_tokens, seed=TASK_CORPUS_SEED)
    if found is None:
        return None
    windows, mask = found
    return Corpus(
        name=f"task:{task.name} (zoo training distribution)", windows=windows, loss_mask=mask
    )


def _file_documents(path: Path, loaded: LoadedModel) -> list[list[int]]:
    if not path.is_file():
        raise BadInput(f"{path}: corpus file not found")
    documents: list[list[int]] = []
    jsonl = path.suffix in {".jsonl", ".json"}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if jsonl:
                documents.append(_json_document(line, where, loaded))
            else:
                documents.append(_encode(line.rstrip("\n"), where, loaded))
    if not documents:
        raise BadInput(f"{path}: no documents in the corpus file")
    return documents


def _json_document(line: str, where: str, loaded: LoadedModel) -> list[int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInput(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict) or not ({"text", "tokens"} & record.keys()):
        raise BadInput(f"{where}: expected an object with a 'text' or a 'tokens' field")
    if "tokens" in record:
        ids = record["tokens"]
        vocab = loaded.info.d_vocab
        if not isinstance(ids, list) or not ids:
            raise BadInput(f"{where}: field 'tokens' must be a non-empty list of token ids")
        for v in ids:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
                raise BadInput(
                    f"{where}: field 'tokens' has {v!r}, not a token id of the model "
                    f"(0..{vocab - 1})"
                )
        return list(ids)
    text = record["text"]
    if not isinstance(text, str) or not text:
        raise BadInput(f"{where}: field 'text' must be a non-empty string")
    return _encode(text, where, loaded)


def _encode(text: str, where: str, loaded: LoadedModel) -> list[int]:
    if loaded.tokenizer is None:
        raise BadInput(
            f"{where}: model {loaded.info.model_id} has no tokenizer; give the corpus as JSONL "
            "with a 'tokens' field"
        )
    return loaded.encode(text, prompt=False)
