"""Reading datasets, the train/eval hold-out, and mixing several datasets by weight.

Where rows come from (`DatasetSpec.path`):
  * a local .json / .jsonl / .parquet / .csv file: read in memory with json / csv / pyarrow,
    so nothing is written to a cache (see "Caching" in ds_rlhf/data/__init__.py). A file holds
    one split, called "train".
  * a directory written by `save_to_disk`: `datasets.load_from_disk` (memory-mapped, read
    only). A saved DatasetDict has its own splits; a saved Dataset has one, "train".
  * anything else (a hub name, a local directory of data files): `datasets.load_dataset`.

Train/eval: with `eval_split` set, eval rows are that split and train rows all of `split`.
Otherwise a seeded random `data.eval_fraction` of the rows of `split` is held out for eval
(at least one row when the fraction is > 0): the rows with the smallest keys, a row's key being
a hash of data.seed and the row's content (`row_keys`; identical rows go by their place in the
file). So the hold-out depends on the seed and the rows only, never on where the file lives (a
dataset staged to node-local scratch, the demo's data inside OUTPUT_DIR): train and eval are
disjoint and the same on every rank and every run. Content rather than position: with
positions, a row inserted or removed, or a re-sorted file, sends every later row to a random
side; with content, reordering changes nothing, rows added or removed move only rows at the
cut (the eval count changes), and an edited row draws its side anew. Each dataset is split on
its own, before mixing, so weights and the other datasets never change its split.

Fingerprints: each split of each dataset has one (`Selection.fingerprint`, a hash of its rows'
keys in order); a checkpoint records them and a resume on other rows stops
(`check_resumed_split`), unless data.allow_changed_data.

Mixing (training rows only): the mix has as many rows as the datasets together (N, counted
after overlong rows are dropped), and dataset i gets round(N * w_i / sum(w)) of them
(largest-remainder rounding, so the counts add up to N). A dataset asked for more rows than
it has is repeated whole as often as it fits, then topped up with a seeded random subset; one
asked for fewer gives a seeded random subset. Rows stay in dataset order and, within a
dataset, in row order (repeats one after the other): shuffling is the job of the trainers'
samplers, which reshuffle every epoch anyway. With one dataset the rows are unchanged. Eval
rows are not weighted: every eval row of every dataset, in the same order.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ds_rlhf.config import DataConfig, DataError, DatasetSpec
from ds_rlhf.extras import require

T = TypeVar("T")

FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
SINGLE_SPLIT = "train"  # the one split of a data file or of a saved Dataset


def where(spec: DatasetSpec, index: int) -> str:
    """How error messages name a dataset: its path and its config entry."""
    return f"dataset {spec.path!r} (data.datasets[{index}])"


@dataclass
class Table:
    """One split of one dataset: its column names, row count and a column reader."""

    split: str
    columns: list[str]
    num_rows: int
    read_column: Callable[[str], list[Any]]


def _rows_to_table(rows: list[Any], split: str, name: str) -> Table:
    columns: dict[str, None] = {}
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{name}: row {k} is {type(row).__name__}, expected an object "
                             "of column: value pairs")
        columns.update(dict.fromkeys(row))
    return Table(split, list(columns), len(rows), lambda c: [row.get(c) for row in rows])


def _read_json(path: Path, name: str) -> list[Any] | dict[str, list]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):  # else: JSON Lines in a .json file; read line-wise
                raise DataError(f"{name}: not valid JSON: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{name}: line {n} is not valid JSON: {e}") from None
    return rows


def _read_file(path: Path, split: str, name: str) -> Table:
    if path.suffix in (".json", ".jsonl"):
        data = _read_json(path, name)
        if isinstance(data, dict):  # columnar: {"col": [v0, v1, ...], ...}
            lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
            if len(lengths) > 1 or -1 in lengths:
                raise DataError(f"{name}: a JSON object must map every column to a list of "
                                 "equal length; or write a list of row objects or JSON Lines")
            n = lengths.pop() if lengths else 0
            return Table(split, list(data), n, lambda c: list(data[c]))
        return _rows_to_table(data, split, name)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)  # every cell stays text ("007" is not turned into 7)
            rows = list(reader)
            return Table(split, list(reader.fieldnames or []), len(rows),
                         lambda c: [row.get(c) for row in rows])
    require("pyarrow", f"{name}: a .parquet file", DataError)
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return Table(split, table.column_names, table.num_rows,
                 lambda c: table.column(c).to_pylist())


def _from_hf(ds: Any, split: str) -> Table:
    return Table(split, list(ds.column_names), len(ds),
                 lambda c: ds.select_columns([c]).to_dict()[c])


def read_split(spec: DatasetSpec, index: int, split: str) -> Table:
    """Rows of one split of one dataset; raises if the split is missing or has no rows."""
    name = where(spec, index)
    path = Path(spec.path)
    if path.is_file() or path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"{name}: file not found; fix data.datasets[{index}].path")
        if path.suffix not in FILE_SUFFIXES:
            raise DataError(f"{name}: unknown file type {path.suffix!r}; use one of "
                             f"{', '.join(FILE_SUFFIXES)}, a save_to_disk directory or a hub name")
        if split != SINGLE_SPLIT:
            raise DataError(f"{name}: a data file has one split, '{SINGLE_SPLIT}', not "
                             f"{split!r}; set data.datasets[{index}].split to '{SINGLE_SPLIT}' "
                             "and hold out eval rows with data.eval_fraction")
        table = _read_file(path, split, name)
    elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        require("datasets", f"{name}: a save_to_disk folder", DataError)
        import datasets

        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise DataError(f"{name}: no split {split!r}; it has {sorted(saved)}; fix "
                                 f"data.datasets[{index}].split or .eval_split")
            table = _from_hf(saved[split], split)
        else:
            if split != SINGLE_SPLIT:
                raise DataError(f"{name}: a saved Dataset has one split, '{SINGLE_SPLIT}', not "
                                 f"{split!r}; save a DatasetDict to name splits, or hold out "
                                 "eval rows with data.eval_fraction")
            table = _from_hf(saved, split)
    else:
        require("datasets", f"{name}: a hub dataset or a directory of data files", DataError)
        import datasets

        try:
            ds = datasets.load_dataset(spec.path, split=split)
        except Exception as e:  # the hub / builder error, with the config entry to fix
            raise DataError(f"{name}: load_dataset({spec.path!r}, split={split!r}) failed: "
                             f"{type(e).__name__}: {e}") from e
        table = _from_hf(ds, split)
    if table.num_rows == 0:
        raise DataError(f"{name}: split {split!r} has no rows; check data.datasets[{index}]"
                         ".path and .split")
    return table


def row_keys(table: Table, seed: int) -> list[bytes]:
    """Each row's key: a hash of data.seed and the row as JSON (columns sorted, null and missing
    values left out, so that a JSON Lines row bringing a new column changes no other row, and a
    row reads the same from .jsonl, .json, .csv with text cells or a hub dataset)."""
    columns = {c: table.read_column(c) for c in table.columns}
    keys = []
    for r in range(table.num_rows):
        row = {c: values[r] for c, values in columns.items() if values[r] is not None}
        text = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                          default=str)
        keys.append(hashlib.sha256(f"{seed}:{text}".encode()).digest())
    return keys


@dataclass
class Selection:
    """The rows of one dataset that one split ("train" or "eval") reads."""

    table: Table | None  # None: no rows (eval with eval_fraction 0 and no eval_split)
    rows: list[int]  # indices into the table, in file order
    fingerprint: str  # hash of those rows' keys in that order: other rows, another order or
    # another data.seed give another one


def _select(table: Table | None, rows: list[int], keys: list[bytes]) -> Selection:
    digest = hashlib.sha256(b"".join(keys[r] for r in rows)).hexdigest()[:16]
    return Selection(table, rows, digest)


def rows_of(cfg: DataConfig, index: int, split: str) -> Selection:
    """The table to read for `split` ("train" or "eval") and the indices of its rows in it."""
    spec = cfg.datasets[index]
    if split == "eval" and spec.eval_split is not None:
        table = read_split(spec, index, spec.eval_split)
        return _select(table, list(range(table.num_rows)), row_keys(table, cfg.seed))
    if split == "eval" and cfg.eval_fraction == 0:
        return _select(None, [], [])  # no eval rows from this dataset: skip reading it
    table = read_split(spec, index, spec.split)
    keys = row_keys(table, cfg.seed)
    rows = list(range(table.num_rows))
    if spec.eval_split is not None or cfg.eval_fraction == 0:
        return _select(table, rows, keys)
    num_eval = min(max(1, round(cfg.eval_fraction * len(rows))), len(rows) - 1)
    if num_eval < 1:
        raise DataError(f"{where(spec, index)}: one row cannot be split into train and eval; "
                         "add rows, set data.eval_fraction: 0, or name an eval_split")
    by_key = sorted(rows, key=lambda r: keys[r])  # stable: identical rows in file order
    held_out = by_key[:num_eval] if split == "eval" else by_key[num_eval:]
    return _select(table, sorted(held_out), keys)


def mix(groups: Sequence[list[T]], weights: Sequence[float], seed: int) -> list[T]:
    """Mix the training rows of several datasets by weight (the rule is in the module doc)."""
    total = sum(len(g) for g in groups)
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(groups)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    rng = random.Random(f"mix:{seed}")
    mixed: list[T] = []
    for group, count in zip(groups, counts, strict=True):
        repeats, rest = divmod(count, len(group))
        mixed.extend(group * repeats)
        mixed.extend(group[k] for k in sorted(rng.sample(range(len(group)), rest)))
    return mixed


class ChangedDataError(DataError):
    """A resume on other rows than the checkpoint's run had. Every rank reads the same data
    and the same checkpoint, so every rank raises it together (cli.py: rank 0 prints it)."""

    every_rank = True


def split_state(train: list[str], held_out: list[str] | None = None) -> list[dict[str, str]]:
    """What a checkpoint records of its data ("data_split" in trainer_state.json): per entry
    of data.datasets, the fingerprints of its train rows and, where the run evaluates (SFT, RM,
    DPO), of its eval rows."""
    if held_out is None:
        return [{"train": t} for t in train]
    return [{"train": t, "eval": e} for t, e in zip(train, held_out, strict=True)]


def check_resumed_split(cfg: DataConfig, state: dict | None, current: list[dict[str, str]],
                        is_main: bool) -> None:
    """Stop a resume whose datasets' rows differ from the checkpoint's (`split_state`): it
    would train on other rows, perhaps ones it held out before, and its eval numbers would
    not compare. data.allow_changed_data: true goes on with a warning. A checkpoint written
    before fingerprints existed resumes as before, with a note."""
    if state is None:
        return  # a fresh start
    recorded = state.get("data_split")
    if recorded is None:
        if is_main:
            print("data: the checkpoint records no fingerprint of its data (written by an "
                  "older ds_rlhf), so the rows are not checked against it", flush=True)
        return
    if len(recorded) != len(current):
        changed = [f"data.datasets has {len(current)} entries, the checkpoint's run had "
                   f"{len(recorded)}"]
    else:
        changed = [f"{where(cfg.datasets[i], i)} ({' and '.join(parts)} rows)"
                   for i, (old, new) in enumerate(zip(recorded, current, strict=True))
                   if (parts := [k for k, v in new.items() if k in old and old[k] != v])]
    if not changed:
        return
    message = (f"{'; '.join(changed)}: not the rows of the checkpoint's run at step "
               f"{state['step']} (rows added, removed, edited or reordered, or another "
               "data.seed or data.eval_fraction), so the run would train on other rows, perhaps "
               "ones it held out for eval")
    if not cfg.allow_changed_data:
        raise ChangedDataError(f"{message}. Resume with that data, start anew in another "
                               "output_dir, or set data.allow_changed_data: true to go on")
    if is_main:
        print(f"data: warning: {message}; going on (data.allow_changed_data)", flush=True)
