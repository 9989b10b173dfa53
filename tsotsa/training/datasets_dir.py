"""Fine-tuning data from a Hugging Face `datasets` directory (what `save_to_disk` writes), as JSONL bytes.

The coordinator takes JSONL, one object a line in one of the row formats of tsotsa.training.formats (text,
prompt/completion, messages, conversations, Alpaca's instruction/input/output); a dataset directory is turned
into exactly that on the sending side, keeping only the columns of its format, so that the coordinator checks
it like any other file (each row is checked here too, so a bad one is named by its row before any upload).
`datasets` is imported only here, when a directory is given: it is slow to import, and plain JSONL files
never need it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tsotsa.errors import TsotsaError
from tsotsa.training.formats import FORMAT_KEYS, REQUIRED_KEYS, RowError, canonical_fields, describe

_BATCH_ROWS = 1000


class DatasetDirError(TsotsaError):
    """A dataset directory cannot be used as fine-tuning data."""


def jsonl_from_dataset_dir(path: Path, split: str | None = None, *,
                           default_splits: Sequence[str] = ("train",)) -> bytes:
    """The rows of the dataset saved at PATH as JSONL bytes (UTF-8, one object a line).

    A `DatasetDict` directory gives its SPLIT; without one, the first of DEFAULT_SPLITS that it has (a
    single `Dataset` directory is used whole). Its columns must be those of one row format ("text";
    "prompt" and "completion"; "messages"; "conversations"; "instruction", "output" and optionally "input"),
    with valid values in every row; other columns are left out.
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
    keys = _format_columns(path, list(dataset.column_names))
    if len(dataset) == 0:
        raise DatasetDirError(f"{path}: no rows")

    lines = []
    index = 0
    for batch in dataset.select_columns(list(keys)).iter(batch_size=_BATCH_ROWS):
        for values in zip(*(batch[key] for key in keys)):
            # a null "input" is an Alpaca row without one (a column some rows leave empty)
            row = {key: value for key, value in zip(keys, values) if not (key == "input" and value is None)}
            _check_row(path, index, row)
            lines.append(json.dumps(row, ensure_ascii=False))
            index += 1
    return ("\n".join(lines) + "\n").encode("utf-8")


def _format_columns(path: Path, names: list[str]) -> tuple[str, ...]:
    """The columns of the one row format (tsotsa.training.formats) the dataset's columns hold."""
    found = [fmt for fmt, keys in FORMAT_KEYS.items() if any(key in names for key in keys)]
    if len(found) > 1:
        raise DatasetDirError(f"{path}: has columns of two formats, {describe(found[0])} and {describe(found[1])}; "
                              "keep one (Dataset.remove_columns)")
    if not found or any(key not in names for key in REQUIRED_KEYS[found[0]]):
        have = ", ".join(names) or "(none)"
        raise DatasetDirError(f'{path}: needs the columns of one format: "text"; "prompt" and "completion"; '
                              f'"messages"; "conversations"; or "instruction" and "output" (and "input"); '
                              f"it has: {have}")
    return tuple(key for key in FORMAT_KEYS[found[0]] if key in names)


def _check_row(path: Path, index: int, row: dict) -> None:
    """The row as the coordinator will judge it, so a bad one is named by its row here, before any upload."""
    for key, value in row.items():
        kind = "a list" if key in ("messages", "conversations") else "a string"
        if value is None or not isinstance(value, list if kind == "a list" else str):
            got = "null" if value is None else type(value).__name__
            raise DatasetDirError(f'{path}: row {index}: "{key}" must be {kind}, got {got}')
    try:
        canonical_fields(row)
    except RowError as error:
        raise DatasetDirError(f"{path}: row {index}: {error}") from None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
