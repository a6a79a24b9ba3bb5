"""JSONL task files: one prompt pair a line, in text or token-id form.

Text form:     {"clean": "...", "corrupt": "...", "answer": " Mary", "wrong": " John"}
Token-id form: {"clean_ids": [...], "corrupt_ids": [...], "answer_id": 7, "wrong_id": 9}

A line may also name the task's metric (`"metric": "prob_diff"`, see `workbench.core.METRICS`);
lines that name one must agree.

Every error names the file, the line number and the field.
"""

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from workbench.core import METRICS
from workbench.errors import BadInput
from workbench.models.base import LoadedModel
from workbench.tasks.spec import PromptPair, Task

TEXT_FIELDS = ("clean", "corrupt", "answer", "wrong")
ID_FIELDS = ("clean_ids", "corrupt_ids", "answer_id", "wrong_id")


def read_task_file(path: Path, model: LoadedModel) -> Task:
    if not path.is_file():
        raise BadInput(f"{path}: task file not found")
    pairs: list[PromptPair] = []
    metric: tuple[str, str] | None = None  # (metric, where it was first named)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadInput(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise BadInput(f"{where}: expected a JSON object")
            pairs.append(_parse_pair(record, model, where))
            if "metric" in record:
                metric = _metric(record["metric"], metric, where)
    if not pairs:
        raise BadInput(f"{path}: no prompt pairs in the file")
    task = Task(name=path.stem, source=str(path.resolve()), pairs=pairs, spec={"file": str(path)})
    return replace(task, metric=metric[0]) if metric else task


def _metric(value: Any, seen: tuple[str, str] | None, where: str) -> tuple[str, str]:
    if not isinstance(value, str) or value not in METRICS:
        raise BadInput(f"{where}: field 'metric' must be one of {', '.join(METRICS)}")
    if seen and seen[0] != value:
        raise BadInput(f"{where}: field 'metric' is {value!r}, but {seen[1]} names {seen[0]!r}")
    return seen or (value, where)


def _parse_pair(record: dict[str, Any], model: LoadedModel, where: str) -> PromptPair:
    if any(k in record for k in ID_FIELDS):
        pair = _parse_ids(record, where)
    elif any(k in record for k in TEXT_FIELDS):
        pair = _parse_text(record, model, where)
    else:
        raise BadInput(f"{where}: expected fields {TEXT_FIELDS} or {ID_FIELDS}")
    _check_pair(pair, model, where)
    return pair


def _parse_ids(record: dict[str, Any], where: str) -> PromptPair:
    for key in ID_FIELDS:
        if key not in record:
            raise BadInput(f"{where}: missing field {key!r}")
    for key in ("clean_ids", "corrupt_ids"):
        value = record[key]
        if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
            raise BadInput(f"{where}: field {key!r} must be a non-empty list of token ids")
    for key in ("answer_id", "wrong_id"):
        if not _is_int(record[key]):
            raise BadInput(f"{where}: field {key!r} must be one token id")
    return PromptPair(
        clean_tokens=list(record["clean_ids"]),
        corrupt_tokens=list(record["corrupt_ids"]),
        answer=record["answer_id"],
        wrong=record["wrong_id"],
    )


def _parse_text(record: dict[str, Any], model: LoadedModel, where: str) -> PromptPair:
    for key in TEXT_FIELDS:
        if key not in record:
            raise BadInput(f"{where}: missing field {key!r}")
        if not isinstance(record[key], str) or not record[key]:
            raise BadInput(f"{where}: field {key!r} must be a non-empty string")
    if model.tokenizer is None:
        raise BadInput(
            f"{where}: model {model.info.model_id} has no tokenizer; use the token-id form "
            "(clean_ids, corrupt_ids, answer_id, wrong_id)"
        )
    single = {}
    for key in ("answer", "wrong"):
        ids = model.encode(record[key], prompt=False)
        if len(ids) != 1:
            raise BadInput(f"{where}: field {key!r} is {len(ids)} tokens, expected exactly one")
        single[key] = ids[0]
    return PromptPair(
        clean_tokens=model.encode(record["clean"]),
        corrupt_tokens=model.encode(record["corrupt"]),
        answer=single["answer"],
        wrong=single["wrong"],
        clean_text=record["clean"],
        corrupt_text=record["corrupt"],
    )


def _check_pair(pair: PromptPair, model: LoadedModel, where: str) -> None:
    n_clean, n_corrupt = len(pair.clean_tokens), len(pair.corrupt_tokens)
    if n_clean != n_corrupt:
        raise BadInput(
            f"{where}: clean and corrupt prompts tokenize to different lengths "
            f"({n_clean} vs {n_corrupt} tokens)"
        )
    n_ctx = model.model.cfg.n_ctx
    if n_clean > n_ctx:
        raise BadInput(f"{where}: prompt is {n_clean} tokens, longer than the context ({n_ctx})")
    d_vocab = model.info.d_vocab
    fields = {"clean": pair.clean_tokens, "corrupt": pair.corrupt_tokens}
    fields |= {"answer": [pair.answer], "wrong": [pair.wrong]}
    for key, ids in fields.items():
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise BadInput(f"{where}: field {key!r} has token id {bad[0]} outside 0..{d_vocab - 1}")
    if pair.answer == pair.wrong:
        raise BadInput(f"{where}: fields 'answer' and 'wrong' are the same token")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
