"""Hugging Face `datasets` directories as fine-tuning data: converted to the coordinator's JSONL on the client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from tsotsa.coordinator.data import parse_jsonl  # noqa: E402
from tsotsa.coordinator_client import CoordinatorClient  # noqa: E402
from tsotsa.errors import TsotsaError  # noqa: E402
from tsotsa.training.datasets_dir import DatasetDirError, jsonl_from_dataset_dir  # noqa: E402
from tsotsa.v1 import tsotsa_pb2 as pb  # noqa: E402


def save(path: Path, columns: dict) -> Path:
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def save_dict(path: Path, splits: dict[str, dict]) -> Path:
    datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in splits.items()}) \
        .save_to_disk(str(path))
    return path


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def test_text_column_keeps_only_text(tmp_path):
    path = save(tmp_path / "ds", {"text": ["héllo wörld", "line\nbreak \"quoted\"", "日本語"], "id": [1, 2, 3]})
    data = jsonl_from_dataset_dir(path)
    assert data.endswith(b"\n") and data.count(b"\n") == 3  # embedded newlines stay escaped
    assert "日本語".encode() in data  # ensure_ascii=False: UTF-8, not \\u escapes
    assert lines(data) == [{"text": "héllo wörld"}, {"text": "line\nbreak \"quoted\""}, {"text": "日本語"}]


def test_prompt_completion_columns(tmp_path):
    path = save(tmp_path / "ds", {"completion": ["4", "6"], "prompt": ["2+2=", "3+3="], "source": ["a", "b"]})
    assert lines(jsonl_from_dataset_dir(path)) == [{"prompt": "2+2=", "completion": "4"},
                                                   {"prompt": "3+3=", "completion": "6"}]


def test_many_rows_keep_their_order(tmp_path):
    texts = [f"row {i}" for i in range(2500)]  # over one conversion batch
    assert [row["text"] for row in lines(jsonl_from_dataset_dir(save(tmp_path / "ds", {"text": texts})))] == texts


def test_dataset_dict_takes_train_or_the_named_split(tmp_path):
    path = save_dict(tmp_path / "dd", {"train": {"text": ["t1", "t2"]}, "test": {"text": ["x"]}})
    assert lines(jsonl_from_dataset_dir(path)) == [{"text": "t1"}, {"text": "t2"}]
    assert lines(jsonl_from_dataset_dir(path, "test")) == [{"text": "x"}]
    with pytest.raises(DatasetDirError, match=r"no split 'validation'; it has: train, test"):
        jsonl_from_dataset_dir(path, "validation")


def test_dataset_dict_without_train_lists_its_splits(tmp_path):
    path = save_dict(tmp_path / "dd", {"validation": {"text": ["v"]}, "extra": {"text": ["e"]}})
    with pytest.raises(DatasetDirError) as caught:
        jsonl_from_dataset_dir(path)
    message = str(caught.value)
    assert "'train'" in message and "it has: validation, extra" in message and "\n" not in message


def test_eval_split_preference(tmp_path):
    both = save_dict(tmp_path / "both", {"train": {"text": ["t"]}, "test": {"text": ["x"]},
                                         "validation": {"text": ["v"]}})
    assert lines(jsonl_from_dataset_dir(both, default_splits=("validation", "test"))) == [{"text": "v"}]
    only_test = save_dict(tmp_path / "test", {"train": {"text": ["t"]}, "test": {"text": ["x"]}})
    assert lines(jsonl_from_dataset_dir(only_test, default_splits=("validation", "test"))) == [{"text": "x"}]
    only_train = save_dict(tmp_path / "train", {"train": {"text": ["t"]}})
    with pytest.raises(DatasetDirError, match=r"'validation' or 'test' split; it has: train"):
        jsonl_from_dataset_dir(only_train, default_splits=("validation", "test"))


def test_single_dataset_has_no_named_split(tmp_path):
    path = save(tmp_path / "ds", {"text": ["a"]})
    with pytest.raises(DatasetDirError, match="single Dataset"):
        jsonl_from_dataset_dir(path, "train")


def test_plain_directory_is_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetDirError, match="not a dataset directory") as caught:
        jsonl_from_dataset_dir(tmp_path / "empty")
    assert isinstance(caught.value, TsotsaError) and "\n" not in str(caught.value)
    with pytest.raises(DatasetDirError, match="no such directory"):
        jsonl_from_dataset_dir(tmp_path / "missing")


def test_corrupt_dataset_directory(tmp_path):
    path = save(tmp_path / "ds", {"text": ["a"]})
    (path / "dataset_info.json").write_text("{not json")
    with pytest.raises(DatasetDirError, match="cannot load the dataset") as caught:
        jsonl_from_dataset_dir(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("columns", [{"question": ["q"], "answer": ["a"]}, {"prompt": ["p"], "answer": ["a"]}])
def test_wrong_columns_are_listed(tmp_path, columns):
    path = save(tmp_path / "ds", columns)
    with pytest.raises(DatasetDirError, match=f"it has: {', '.join(columns)}$"):
        jsonl_from_dataset_dir(path)


def test_text_and_prompt_columns_together_are_ambiguous(tmp_path):
    path = save(tmp_path / "ds", {"text": ["t"], "prompt": ["p"], "completion": ["c"]})
    with pytest.raises(DatasetDirError, match='has columns of two formats, "text" and "prompt"/"completion"; keep one'):
        jsonl_from_dataset_dir(path)


@pytest.mark.parametrize("columns, message", [
    ({"text": ["ok", "fine", None]}, 'row 2: "text" must be a string, got null'),
    ({"text": [1, 2]}, 'row 0: "text" must be a string, got int'),
    ({"prompt": ["a", "b"], "completion": ["x", None]}, 'row 1: "completion" must be a string, got null'),
    ({"prompt": [["a", "b"]], "completion": ["x"]}, 'row 0: "prompt" must be a string, got list'),
])
def test_non_string_values_name_the_row(tmp_path, columns, message):
    with pytest.raises(DatasetDirError, match=message):
        jsonl_from_dataset_dir(save(tmp_path / "ds", columns))


def test_empty_dataset(tmp_path):
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).filter(lambda row: False).save_to_disk(str(path))
    with pytest.raises(DatasetDirError, match="no rows"):
        jsonl_from_dataset_dir(path)
    # Saved with no shard at all, which `datasets` itself then fails to load: still one line, not a traceback.
    save(tmp_path / "no-shards", {"text": []})
    with pytest.raises(DatasetDirError, match="cannot load the dataset: ") as caught:
        jsonl_from_dataset_dir(tmp_path / "no-shards")
    assert "\n" not in str(caught.value)


def test_output_passes_the_coordinators_parser(tmp_path):
    text = save(tmp_path / "text", {"text": ["a\nb", "ünïcode ✓", "tab\there"]})
    rows = parse_jsonl(jsonl_from_dataset_dir(text), "text")
    assert [row.fields for row in rows] == [{"text": "a\nb"}, {"text": "ünïcode ✓"}, {"text": "tab\there"}]
    pairs = save_dict(tmp_path / "pairs", {"train": {"prompt": ["Q: 1?", "Q: 2?"], "completion": [" 1", " 2"]}})
    rows = parse_jsonl(jsonl_from_dataset_dir(pairs), "pairs")
    assert [row.fields for row in rows] == [{"prompt": "Q: 1?", "completion": " 1"},
                                           {"prompt": "Q: 2?", "completion": " 2"}]


class _RecordingStub:
    """Stands in for the coordinator: keeps the uploads and the CreateRun request instead of sending them."""

    def __init__(self) -> None:
        self.requests: list[pb.CreateRunRequest] = []
        self.uploads: dict[str, tuple[str, bytes]] = {}

    def UploadData(self, chunks, timeout=None, metadata=None):  # noqa: N802 (the gRPC method's name)
        chunks = list(chunks)
        data = b"".join(chunk.data for chunk in chunks)
        assert chunks[0].total_bytes == len(data) and chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
        upload_id = f"upload-{len(self.uploads)}"
        self.uploads[upload_id] = (chunks[0].name, data)
        return pb.DataUpload(upload_id=upload_id, total_bytes=len(data), sha256=chunks[-1].sha256)

    def CreateRun(self, request, timeout=None, metadata=None):  # noqa: N802
        self.requests.append(request)
        return pb.RunInfo(name=request.name)


def create(train: Path, eval: Path | None) -> tuple[pb.CreateRunRequest, dict[str, tuple[str, bytes]]]:
    """The CreateRun request the client sends, and its uploads by id: (name, bytes)."""
    with CoordinatorClient("127.0.0.1:1", admin_token="secret") as client:  # the channel is never used
        client._stub = stub = _RecordingStub()
        client.create_run("run", pb.RunConfig(), train, eval)
    return stub.requests[0], stub.uploads


def test_runs_client_sends_directories_as_jsonl(tmp_path):
    data = save_dict(tmp_path / "my-data", {"train": {"text": ["t1", "t2"]}, "validation": {"text": ["v"]},
                                            "test": {"text": ["x"]}})
    request, uploads = create(data, data)
    assert request.train_name == "my-data" and request.eval_name == "my-data"
    assert not request.train_data and not request.eval_data  # uploaded, not inline
    train_name, train = uploads[request.train_upload]
    eval_name, evaluation = uploads[request.eval_upload]
    assert (train_name, eval_name) == ("my-data", "my-data")
    assert lines(train) == [{"text": "t1"}, {"text": "t2"}]
    assert lines(evaluation) == [{"text": "v"}]  # validation before test
    assert parse_jsonl(train, train_name) and parse_jsonl(evaluation, eval_name)


def test_runs_client_keeps_files_as_they_are(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"text": "raw bytes, sent unchanged"}\n')
    single = save(tmp_path / "evalset", {"prompt": ["p"], "completion": ["c"]})
    request, uploads = create(train, single)
    assert (request.train_name, uploads[request.train_upload]) == ("train.jsonl", ("train.jsonl", train.read_bytes()))
    assert request.eval_name == "evalset" and lines(uploads[request.eval_upload][1]) == [{"prompt": "p",
                                                                                           "completion": "c"}]
    request, uploads = create(train, None)
    assert request.eval_upload == "" and len(uploads) == 1
    request, uploads = create(train, train)  # the same file for both: uploaded once
    assert request.train_upload == request.eval_upload and len(uploads) == 1


def test_chat_and_alpaca_columns(tmp_path):
    chats = save(tmp_path / "chats", {"messages": [[{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "ho"}]], "id": [1]})
    assert lines(jsonl_from_dataset_dir(chats)) == [{"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "ho"}]}]
    shared = save(tmp_path / "sharegpt", {"conversations": [[{"from": "human", "value": "a"},
                                                             {"from": "gpt", "value": "b"}]]})
    assert parse_jsonl(jsonl_from_dataset_dir(shared), "s")[0].fields["messages"][1] == {"role": "assistant",
                                                                                       "content": "b"}
    alpaca = save(tmp_path / "alpaca", {"instruction": ["i1", "i2"], "input": ["x", None], "output": ["o1", "o2"]})
    assert lines(jsonl_from_dataset_dir(alpaca)) == [{"instruction": "i1", "input": "x", "output": "o1"},
                                                     {"instruction": "i2", "output": "o2"}]


@pytest.mark.parametrize("columns, message", [
    ({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}], None]},
     r'row 1: "messages" must be a list, got null'),
    ({"messages": [[{"role": "user", "content": "hi"}]]}, r'row 0: "messages" has no assistant turn'),
    ({"conversations": [[{"from": "bot", "value": "x"}]]}, r"row 0: conversations\[0\]: \"from\" 'bot' is not"),
    ({"instruction": ["i"], "output": [""]}, r'row 0: "output" is empty'),
    ({"instruction": ["i"], "input": ["x"]}, r'needs the columns of one format: .*it has: instruction, input$'),
    ({"messages": [[]], "instruction": ["i"], "output": ["o"]},
     r'has columns of two formats, "messages" and "instruction"/"input"/"output"'),
])
def test_bad_chat_and_alpaca_rows_name_the_row(tmp_path, columns, message):
    with pytest.raises(DatasetDirError, match=message):
        jsonl_from_dataset_dir(save(tmp_path / "ds", columns))


def test_runs_client_eval_directory_without_eval_split(tmp_path):
    data = save_dict(tmp_path / "dd", {"train": {"text": ["t"]}})
    with pytest.raises(DatasetDirError, match=r"^evaluation data .*dd: a DatasetDict without a 'validation' or "
                                              r"'test' split; it has: train$"):
        create(data, data)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetDirError, match=r"^training data .*plain: not a dataset directory"):
        create(tmp_path / "plain", None)
