"""JSONL task files: one prompt pair a line, in text or token-id form.

Text form:     {"clean": "...", "corrupt": "...", "answer": " Mary", "wrong": " John"}
Token-id form: {"clean_ids": [...], "corrupt_ids": [...], "answer_id": 7, "wrong_id": 9}

A line may also name the task's metric (`"metric": "prob_diff"`, see `workbench.core.METRICS`);
lines that name one must agree.

Every error names the file, the line number and the field; an absurdly long path is shortened
in the sentence (`shown_path`).

Sizes are checked before anything costly: the file is read a line at a time, and no line is
read past `max_line_chars` characters (`line_limit`: 64 characters per position of the model's
context, at least 4,096; `WORKBENCH_TASK_MAX_LINE_CHARS` sets another), so a huge line is
refused after reading only that much of it, before it is parsed or tokenized. A token-id list
longer than the context is refused before it is copied; a text prompt is tokenized only once its
line has passed the limit.
"""

import json
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from workbench.core import METRICS
from workbench.errors import BadInput
from workbench.models.base import LoadedModel
from workbench.tasks.spec import PromptPair, Task

TEXT_FIELDS = ("clean", "corrupt", "answer", "wrong")
ID_FIELDS = ("clean_ids", "corrupt_ids", "answer_id", "wrong_id")

LINE_CHARS_PER_POSITION = 64  # the line limit per position of the model's context
MIN_LINE_CHARS = 4096  # the line limit however short the context
LINE_LIMIT_ENV = "WORKBENCH_TASK_MAX_LINE_CHARS"
SHOWN_PATH_CHARS = 120  # a longer path is shown by its start and end in error sentences


def line_limit(model: LoadedModel) -> int:
    """The longest task-file line (characters, newline excluded) read for `model`:
    `$WORKBENCH_TASK_MAX_LINE_CHARS`, else 64 per context position, at least 4,096."""
    value = os.environ.get(LINE_LIMIT_ENV, "").strip()
    if not value:
        return max(MIN_LINE_CHARS, LINE_CHARS_PER_POSITION * _n_ctx(model))
    if not value.isdigit() or int(value) < 1:
        raise BadInput(f"{LINE_LIMIT_ENV}={value!r}: expected a positive number of characters")
    return int(value)


def read_task_file(path: Path, model: LoadedModel, *, max_line_chars: int | None = None) -> Task:
    """The task in the JSONL file at `path`, tokenized for `model`; a line longer than
    `max_line_chars` (default: `line_limit(model)`) is refused unread past the limit."""
    limit = max_line_chars if max_line_chars is not None else line_limit(model)
    _check_is_file(path)
    pairs: list[PromptPair] = []
    metric: tuple[str, str] | None = None  # (metric, where it was first named)
    for lineno, line in _lines(path, limit):
        if not line.strip():
            continue
        where = f"{shown_path(path)}:{lineno}"
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
        raise BadInput(f"{shown_path(path)}: no prompt pairs in the file")
    task = Task(name=path.stem, source=str(path.resolve()), pairs=pairs, spec={"file": str(path)})
    return replace(task, metric=metric[0]) if metric else task


def _check_is_file(path: Path) -> None:
    try:
        if path.is_file():
            return
        exists = path.exists()
    except OSError as err:
        raise BadInput(f"{shown_path(path)}: cannot open the task file ({_reason(err)})") from None
    if not exists:
        raise BadInput(f"{shown_path(path)}: task file not found")
    raise BadInput(f"{shown_path(path)}: not a task file (a directory or another special file)")


def _lines(path: Path, limit: int) -> Iterator[tuple[int, str]]:
    """(line number, line) of the file, each line read only up to `limit` characters: a longer
    one is BadInput naming the field it was cut in; so are unreadable and non-UTF-8 files."""
    try:
        # undecodable bytes come through as lone surrogates, so the line that has them is named
        with path.open(encoding="utf-8", errors="surrogateescape") as fh:
            yield from _numbered(fh, path, limit)
    except OSError as err:
        raise BadInput(f"{shown_path(path)}: cannot read the task file ({_reason(err)})") from None
    except ValueError as err:  # a NUL in the path
        raise BadInput(f"{shown_path(path)}: cannot open the task file ({err})") from None


def _numbered(fh: IO[str], path: Path, limit: int) -> Iterator[tuple[int, str]]:
    lineno = 0
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if _UNDECODED.search(line):
            raise BadInput(f"{shown_path(path)}:{lineno}: not UTF-8 text")
        if len(line) > limit and not line.endswith("\n"):
            raise BadInput(_too_long(line, f"{shown_path(path)}:{lineno}", limit))
        yield lineno, line


def _too_long(start: str, where: str, limit: int) -> str:
    field = _field_at_cut(start)
    what = f"field {field!r} makes the line" if field else "the line is"
    return (
        f"{where}: {what} longer than {limit:,} characters (the limit for this model's "
        f"context; set {LINE_LIMIT_ENV} to change it)"
    )


_UNDECODED = re.compile("[\udc80-\udcff]")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _field_at_cut(text: str) -> str | None:
    """The top-level key of the JSON object whose value `text` (the start of the object) is cut
    in; None when it is cut elsewhere (in a key)."""
    depth, pos, key, candidate, in_key = 0, 0, None, None, False
    while pos < len(text):
        char = text[pos]
        if char == '"':
            string = _STRING.match(text, pos)
            if string is None:  # the cut falls inside this string
                return None if depth == 1 and in_key else key
            if depth == 1 and in_key:
                candidate = string.group()[1:-1]
            pos = string.end()
            continue
        if char in "{[":
            depth += 1
            in_key = depth == 1 and char == "{"
        elif char in "}]":
            depth -= 1
        elif depth == 1 and char == ",":
            in_key = True
        elif depth == 1 and char == ":":
            key, in_key = candidate, False
        pos += 1
    return key


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _metric(value: Any, seen: tuple[str, str] | None, where: str) -> tuple[str, str]:
    if not isinstance(value, str) or value not in METRICS:
        raise BadInput(f"{where}: field 'metric' must be one of {', '.join(METRICS)}")
    if seen and seen[0] != value:
        raise BadInput(f"{where}: field 'metric' is {value!r}, but {seen[1]} names {seen[0]!r}")
    return seen or (value, where)


def _parse_pair(record: dict[str, Any], model: LoadedModel, where: str) -> PromptPair:
    if any(k in record for k in ID_FIELDS):
        pair = _parse_ids(record, model, where)
    elif any(k in record for k in TEXT_FIELDS):
        pair = _parse_text(record, model, where)
    else:
        raise BadInput(f"{where}: expected fields {TEXT_FIELDS} or {ID_FIELDS}")
    _check_pair(pair, model, where)
    return pair


def _parse_ids(record: dict[str, Any], model: LoadedModel, where: str) -> PromptPair:
    for key in ID_FIELDS:
        if key not in record:
            raise BadInput(f"{where}: missing field {key!r}")
    n_ctx = _n_ctx(model)
    for key in ("clean_ids", "corrupt_ids"):
        value = record[key]
        if not isinstance(value, list) or not value:
            raise BadInput(f"{where}: field {key!r} must be a non-empty list of token ids")
        if len(value) > n_ctx:
            raise BadInput(
                f"{where}: field {key!r} has {len(value)} token ids, more than the context "
                f"({n_ctx})"
            )
        if not all(_is_int(v) for v in value):
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
    prompts = {key: _encode_prompt(record[key], key, model, where) for key in ("clean", "corrupt")}
    return PromptPair(
        clean_tokens=prompts["clean"],
        corrupt_tokens=prompts["corrupt"],
        answer=single["answer"],
        wrong=single["wrong"],
        clean_text=record["clean"],
        corrupt_text=record["corrupt"],
    )


def _encode_prompt(text: str, key: str, model: LoadedModel, where: str) -> list[int]:
    ids = model.encode(text)
    n_ctx = _n_ctx(model)
    if len(ids) > n_ctx:
        raise BadInput(
            f"{where}: field {key!r} is {len(ids)} tokens, longer than the context ({n_ctx})"
        )
    return ids


def _check_pair(pair: PromptPair, model: LoadedModel, where: str) -> None:
    n_clean, n_corrupt = len(pair.clean_tokens), len(pair.corrupt_tokens)
    if n_clean != n_corrupt:
        raise BadInput(
            f"{where}: clean and corrupt prompts tokenize to different lengths "
            f"({n_clean} vs {n_corrupt} tokens)"
        )
    d_vocab = model.info.d_vocab
    fields = {"clean": pair.clean_tokens, "corrupt": pair.corrupt_tokens}
    fields |= {"answer": [pair.answer], "wrong": [pair.wrong]}
    for key, ids in fields.items():
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise BadInput(f"{where}: field {key!r} has token id {bad[0]} outside 0..{d_vocab - 1}")
    if pair.answer == pair.wrong:
        raise BadInput(f"{where}: fields 'answer' and 'wrong' are the same token")


def _n_ctx(model: LoadedModel) -> int:
    return int(model.model.cfg.n_ctx)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shown_path(path: Path | str) -> str:
    """`path` for an error sentence: control characters escaped, an absurdly long path by its
    start and end."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(path))
    if len(text) <= SHOWN_PATH_CHARS:
        return text
    return f"{text[:60]}...{text[-40:]} ({len(text):,} characters)"
