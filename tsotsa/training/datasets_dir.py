"""Fine-tuning data from a Hugging Face `datasets` directory (what `save_to_disk` writes), as JSONL bytes.

The coordinator takes JSONL, one `{"text": ...}` or `{"prompt": ..., "completion": ...}` object a line; a
dataset directory is turned into exactly that on the sending side, keeping only those columns, so that the
coordinator checks it like any other file. `datasets` is imported only here, when a directory is given: it
is slow to import, and plain JSONL files never need it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tsotsa.errors import TsotsaError

_BATCH_ROWS = 1000


class DatasetDirError(TsotsaError):
    """A dataset directory cannot be used as fine-tuning data."""


def jsonl_from_dataset_dir(path: Path, split: str | None = None, *,
                           default_splits: Sequence[str] = ("train",)) -> bytes:
    """The rows of the dataset saved at PATH as JSONL bytes (UTF-8, one object a line).

    A `DatasetDict` directory gives its SPLIT; without one, the first of DEFAULT_SPLITS that it has (a
    single `Dataset` directory is used whole). Every row must hold strings in a "text" column, or in
    "prompt" and "completion" columns; other columns are left out.
    """
    try:
        import datasets
    except ImportError:
        raise DatasetDirError(f"{path}: reading a dataset directory needs the `datasets` package "
                              "(pip install datasets)") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        if not Path(path).is_dir():
            raise DatasetDirError(f"{path}: no such directory") from None
        raise DatasetDirError(f"{path}: not a dataset directory (no files written by Dataset.save_to_disk "
                              "or DatasetDict.save_to_disk)") from None
    except Exception as error:  # corrupted or foreign files: pyarrow, json and datasets each raise their own
        raise DatasetDirError(f"{path}: cannot load the dataset: {_one_line(error)}") from None

    if isinstance(loaded, datasets.DatasetDict):
        dataset = loaded[_pick_split(path, list(loaded), split, default_splits)]
    elif split is not None:
        raise DatasetDirError(f"{path}: holds a single Dataset, not a DatasetDict, so it has no split {split!r}")
    else:
        dataset = loaded
    return _to_jsonl(path, dataset)


def _pick_split(path: Path, splits: list[str], split: str | None, default_splits: Sequence[str]) -> str:
    have = ", ".join(splits) or "(none)"
    if split is not None:
        if split not in splits:
            raise DatasetDirError(f"{path}: no split {split!r}; it has: {have}")
        return split
    for name in default_splits:
        if name in splits:
            return name
    wanted = " or ".join(repr(name) for name in default_splits)
    raise DatasetDirError(f"{path}: a DatasetDict without a {wanted} split; it has: {have}")


def _to_jsonl(path: Path, dataset) -> bytes:
    names = list(dataset.column_names)
    has_text, has_pair = "text" in names, "prompt" in names or "completion" in names
    if has_text and has_pair:
        raise DatasetDirError(f'{path}: has both a "text" column and "prompt"/"completion" columns; keep one '
                              "kind (Dataset.remove_columns)")
    if has_text:
        keys = ("text",)
    elif "prompt" in names and "completion" in names:
        keys = ("prompt", "completion")
    else:
        have = ", ".join(names) or "(none)"
        raise DatasetDirError(f'{path}: needs a "text" column, or "prompt" and "completion" columns; '
                              f"it has: {have}")
    if len(dataset) == 0:
        raise DatasetDirError(f"{path}: no rows")

    lines = []
    index = 0
    for batch in dataset.select_columns(list(keys)).iter(batch_size=_BATCH_ROWS):
        columns = [batch[key] for key in keys]
        for values in zip(*columns):
            for key, value in zip(keys, values):
                if not isinstance(value, str):
                    kind = "null" if value is None else type(value).__name__
                    raise DatasetDirError(f'{path}: row {index}: "{key}" must be a string, got {kind}')
            lines.append(json.dumps(dict(zip(keys, values)), ensure_ascii=False))
            index += 1
    return ("\n".join(lines) + "\n").encode("utf-8")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
