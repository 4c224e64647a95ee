"""One reader for every command: training, evaluation and the data-driven statistics see the same documents and refuse
the same files with the same message."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from deltawise.adapt.data import read_examples
from deltawise.data.read import load_items
from deltawise.data.tasks import load_data
from deltawise.errors import InputError
from deltawise.eval.choice import context_of


def texts_by_entry_point(path: Path) -> dict[str, list[str]]:
    """The documents that training (train, bam), evaluation (eval, analyze interpolate) and the
    data-driven statistics (fisher, gram, soup, atlas) read from ``path``."""
    return {
        "training": [e.text for e in read_examples(path)],
        "evaluation": [i.text for i in load_items(path)],
        "statistics": [i.text for i in load_data(path).items],
    }


def errors_by_entry_point(path: Path) -> dict[str, str]:
    messages = {}
    for name, read in (("training", read_examples), ("evaluation", load_items), ("statistics", load_data)):
        with pytest.raises(InputError) as err:
            read(path)
        messages[name] = str(err.value)
    return messages


def test_fortune_entry_with_a_blank_line_is_one_document_everywhere(tmp_path):
    fortunes = tmp_path / "computers"  # Debian fortune files have no suffix
    fortunes.write_text("A fortune\n\nwith a blank line inside.\n  -- someone\n%\nSecond one.\n%\n")
    expected = ["A fortune\n\nwith a blank line inside.\n  -- someone", "Second one."]
    assert texts_by_entry_point(fortunes) == {"training": expected, "evaluation": expected, "statistics": expected}


def test_without_percent_lines_blank_or_whitespace_lines_separate_documents(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("one\ntwo\n\nthree\n \t\nfour\n\n\n% not a separator\n")
    expected = ["one\ntwo", "three", "four", "% not a separator"]
    assert texts_by_entry_point(text) == {"training": expected, "evaluation": expected, "statistics": expected}


def test_csv_is_refused_by_train_and_eval_with_the_same_message(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("text,label\nhello,1\n")
    messages = errors_by_entry_point(csv)
    assert len(set(messages.values())) == 1, messages
    assert f"{csv}: unsupported dataset format '.csv'" in messages["training"]


@pytest.mark.parametrize("name", ["blob.txt", "blob"])
def test_binary_file_is_refused_with_a_message_naming_it(tmp_path, name):
    blob = tmp_path / name
    blob.write_bytes(b"PK\x03\x04\x00\x00binary\xff\xfe")
    for message in errors_by_entry_point(blob).values():
        assert str(blob) in message and "binary" in message


def test_non_utf8_text_is_refused_with_a_message_naming_it(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    for message in errors_by_entry_point(latin1).values():
        assert f"{latin1} is not UTF-8 text (invalid byte at offset 3)" in message


def test_jsonl_record_missing_a_field_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"txt": "typo"}) + "\n")
    for message in errors_by_entry_point(data).values():
        assert f"{data}:3" in message, message
    labelled = tmp_path / "l.jsonl"
    labelled.write_text(json.dumps({"text": "a", "label": 1}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(InputError, match=f"{re.escape(str(labelled))}:2: classification records need 'text' and 'label'"):
        read_examples(labelled, "classification")
    with pytest.raises(InputError, match=f"{re.escape(str(labelled))}:2 .*needs labelled data"):
        load_data(labelled, need_labels=True)


def test_multiple_choice_item_without_question_names_file_and_line(tmp_path):
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text(json.dumps({"id": "q7", "choices": ["a", "b"], "answer": 0}) + "\n")
    (item,) = load_items(quiz, require=("choices", "answer"))
    with pytest.raises(InputError, match=f"{re.escape(str(quiz))}:1 \\(item 'q7'\\): a multiple-choice item has neither"):
        context_of(item)


def test_jsonl_without_the_suffix_is_read_as_jsonl_everywhere(tmp_path):
    data = tmp_path / "records"
    data.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    expected = ["first", "second"]
    assert texts_by_entry_point(data) == {"training": expected, "evaluation": expected, "statistics": expected}
    broken = tmp_path / "broken"
    broken.write_text("{not json\n")
    for message in errors_by_entry_point(broken).values():
        assert f"{broken}:1: not valid JSON" in message and "starts with '{'" in message


def test_training_reads_a_datasets_folder_like_eval(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "Q: 2+2?", "response": " 4"}, {"prompt": "Hi", "response": " there"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    examples = read_examples(tmp_path / "ds")
    assert [(e.prompt, e.text) for e in examples] == [("Q: 2+2?", " 4"), ("Hi", " there")]


def test_bam_fingerprints_a_data_folder_by_its_files(tmp_path):
    from deltawise.adapt.bam import _file_sha256

    folder = tmp_path / "ds"
    (folder / "train").mkdir(parents=True)
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"rows")
    before = _file_sha256(folder)
    (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"other rows")
    assert _file_sha256(folder) != before
    single = tmp_path / "d.txt"
    single.write_text("one\n")
    assert _file_sha256(single) == hashlib.sha256(b"one\n").hexdigest()  # files keep the fingerprint they had
