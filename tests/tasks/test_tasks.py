"""Task files: both forms load; every kind of bad line names the file, line and field."""

import json

import pytest

from tests.conftest import write_jsonl
from workbench.errors import BadInput
from workbench.tasks import load_task


def test_text_form_tokenizes_with_bos(tmp_path, induction_final):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            json.dumps(
                {
                    "clean": "apple river apple",
                    "corrupt": "stone river apple",
                    "answer": " river",
                    "wrong": " stone",
                }
            )
        ],
    )
    task = load_task(str(path), induction_final)
    (pair,) = task.pairs
    vocab = induction_final.tokenizer.get_vocab()
    assert pair.clean_tokens == [vocab["<bos>"], vocab["apple"], vocab["river"], vocab["apple"]]
    assert pair.answer == vocab["river"] and pair.wrong == vocab["stone"]
    assert task.name == "t" and task.task_id.startswith("t-")


def test_token_id_form(tmp_path, induction_final):
    path = write_jsonl(
        tmp_path / "ids.jsonl",
        [
            json.dumps(
                {"clean_ids": [1, 5, 6], "corrupt_ids": [1, 7, 6], "answer_id": 5, "wrong_id": 7}
            )
        ]
        * 3,
    )
    task = load_task(str(path), induction_final)
    assert len(task.pairs) == 3 and task.pairs[0].clean_tokens == [1, 5, 6]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"clean": "apple river", ', r"bad\.jsonl:2: not valid JSON"),
        (
            '{"clean": "apple", "corrupt": "stone", "answer": " river"}',
            r"bad\.jsonl:2: missing field 'wrong'",
        ),
        (
            '{"clean": "apple river", "corrupt": "stone", "answer": " river", "wrong": " stone"}',
            r"bad\.jsonl:2: clean and corrupt prompts tokenize to different lengths \(3 vs 2",
        ),
        (
            '{"clean": "apple", "corrupt": "stone", "answer": " river stone", "wrong": " stone"}',
            r"bad\.jsonl:2: field 'answer' is 2 tokens",
        ),
        (
            '{"clean_ids": [1, 2], "corrupt_ids": [1, 2], "answer_id": 99999, "wrong_id": 3}',
            r"bad\.jsonl:2: field 'answer' has token id 99999",
        ),
        (
            '{"clean_ids": "1 2", "corrupt_ids": [1], "answer_id": 1, "wrong_id": 3}',
            r"bad\.jsonl:2: field 'clean_ids'",
        ),
        ("[1, 2, 3]", r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_name_line_and_field(tmp_path, induction_final, line, message):
    good = json.dumps({"clean": "apple", "corrupt": "stone", "answer": " river", "wrong": " stone"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(BadInput, match=message):
        load_task(str(path), induction_final)


def test_missing_file_and_unknown_task(tmp_path, induction_final):
    with pytest.raises(BadInput, match="task file not found"):
        load_task(str(tmp_path / "none.jsonl"), induction_final)
    with pytest.raises(BadInput, match="unknown task 'nope'"):
        load_task("nope", induction_final)


def test_builtin_induction_task_breaks_only_the_repeat(induction_task, induction_final):
    pair = induction_task.pairs[0]
    assert len(pair.clean_tokens) == len(pair.corrupt_tokens)
    assert pair.clean_tokens[-5:] == pair.corrupt_tokens[-5:]  # the repeated prefix is kept
    assert pair.clean_tokens[1:9] != pair.corrupt_tokens[1:9]  # the first copy differs
    assert pair.answer == pair.clean_tokens[1 + 5]
    assert load_task("induction", induction_final).sha256 == induction_task.sha256
    assert load_task("induction", induction_final, n_prompts=8).sha256 != induction_task.sha256
