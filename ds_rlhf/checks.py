"""Every model, tokenizer and dataset named in a run config, checked before anything starts.

`check_inputs(cfg)` runs in `ds-rlhf` right after the config loads, before any engine is built
or any file is written, for every step (it walks the config, so any run config made of
ModelConfig and DataConfig sections is covered). Each failure is one ConfigError/DataError
naming the config field and the fix:

- a model (`<role>.model.path`) is a local directory holding config.json and weight files
  (*.safetensors or pytorch_model*.bin, every shard an index lists), or a hub name that is in
  the local Hugging Face cache or, online, exists on the hub. One quick request without
  retries decides, so a missing name fails in well under a second instead of after the
  ~25 s of retries from_pretrained spends; with HF_HUB_OFFLINE set no request is made.
- a GGUF checkpoint (`<role>.model.gguf_file`): the gguf package is installed, `path` is set
  and holds the file (a local directory, or a hub repo checked as above).
- a tokenizer (`<role>.model.tokenizer`): a local directory with tokenizer files, or a hub name
  checked the same way.
- a dataset (`data.datasets[i].path`): a local file that is readable and decodes (.json,
  .jsonl and .csv as UTF-8 text, .parquet by its magic bytes), a local directory, or a hub
  dataset that exists (checked online only: `datasets` keeps its own cache); the package that
  reads it is installed (`datasets`, or pyarrow for .parquet: the `hub` extra).
- W&B (`tracking.wandb_project`): the wandb package is installed (the `wandb` extra).
- with `checkpoint.resume: fresh`, none of them lies in what that moves aside (the previous
  run's files in output_dir, `checkpoint.RUN_FILES`) before the engines read it.

`check_environment(cfg)` names every environment variable the config asks for (reward server
tokens, `rewards[i].token_env`) that is unset or empty. Every rank runs both: a node may lack
a file or a variable that the first node has (the deepspeed launcher forwards few variables
over ssh), and the ranks then stop together naming the rank and host (cli.py).
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ds_rlhf.checkpoint import PREVIOUS, RUN_FILES
from ds_rlhf.config import ConfigError, DataConfig, DataError, ModelConfig, TrackingConfig
from ds_rlhf.data.sources import FILE_SUFFIXES, where
from ds_rlhf.extras import require

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "tokenizer.model", "spiece.model")
HUB_TIMEOUT_S = 10.0  # one request to the hub; DNS failures come back at once
CHUNK = 1 << 20  # bytes decoded at a time: a large dataset is never held twice in memory


def check_inputs(cfg: Any) -> None:
    """Check every ModelConfig and DataConfig found in `cfg` (a run config dataclass)."""
    for name, value in _sections(cfg, ""):
        if isinstance(value, ModelConfig):
            if value.gguf_file is not None:
                check_gguf(value, name)
            elif value.path is not None:
                check_model(value.path, f"{name}.path")
            if value.path is not None:
                check_not_moved(cfg, value.path, f"{name}.path")
            if value.tokenizer is not None:
                check_tokenizer(value.tokenizer, f"{name}.tokenizer")
                check_not_moved(cfg, value.tokenizer, f"{name}.tokenizer")
        elif isinstance(value, DataConfig):
            for i, spec in enumerate(value.datasets):
                check_dataset(spec.path, where(spec, i))
                check_not_moved(cfg, spec.path, where(spec, i))
        elif isinstance(value, TrackingConfig) and value.wandb_project is not None:
            require("wandb", f"{name}.wandb_project", ConfigError)


def check_not_moved(cfg: Any, path: str, field: str) -> None:
    """A local input of a run with checkpoint.resume: fresh is not among what that moves aside
    before the engines load it (the previous run's export, say: `actor.model.path:
    OUTPUT_DIR/actor`), which would fail later with a missing path."""
    if cfg.checkpoint.resume != "fresh" or not Path(path).exists():
        return
    out = Path(cfg.output_dir).resolve()
    for name in RUN_FILES:
        if Path(path).resolve().is_relative_to(out / name):
            raise ConfigError(
                f"{field}: {path} is in output_dir's {name}, which checkpoint.resume: fresh "
                f"moves aside (into {out / PREVIOUS}-<time>/) before this run reads it; copy "
                "it out of output_dir first, or use another output_dir")


def check_environment(cfg: Any) -> None:
    """Every `token_env` of `cfg.rewards` (PPO) names a variable that is set and not empty."""
    missing = [f"{spec.token_env} (rewards[{i}].token_env)"
               for i, spec in enumerate(getattr(cfg, "rewards", []))
               if spec.token_env and not os.environ.get(spec.token_env)]
    if missing:
        raise ConfigError(
            f"environment variable{'s' if len(missing) > 1 else ''} {', '.join(missing)} not "
            "set or empty; export it on every node (the deepspeed launcher passes only a few "
            "variables to other nodes: list it in a .deepspeed_env file, see "
            "launch/multi_node.sh)")


def _sections(obj: Any, prefix: str):
    """(dotted field name, value) of every dataclass inside `obj`, depth first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            name = f"{prefix}{f.name}"
            yield name, value
            yield from _sections(value, f"{name}.")


def _is_hub_name(name: str) -> bool:
    """'org/model' or 'model' as the hub spells repo ids; paths like ./x, /x, a/b/c are not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _check_hub(name: str, field: str, what: str, cached_files: tuple[str, ...]) -> None:
    """A hub model name: in the local cache, or (online) on the hub."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if any(isinstance(try_to_load_from_cache(name, f), str) for f in cached_files):
        return
    not_here = (f"{field}: {name!r} is not a local directory, and as a hub {what} it is not in "
                f"the local Hugging Face cache ({constants.HF_HUB_CACHE})")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{not_here} and HF_HUB_OFFLINE is set; download it first "
                          "(huggingface-cli download) or give a local directory")
    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; from_pretrained says what access it needs
    except RepositoryNotFoundError:
        raise ConfigError(f"{not_here} and the hub has no model of that name (or it is "
                          "private: log in with huggingface-cli login); fix the name or give a "
                          "local directory") from None
    except HfHubHTTPError:
        return  # the hub answered; let from_pretrained report its own error
    except Exception as e:  # no network: from_pretrained would retry for ~25 s, then fail
        raise ConfigError(f"{not_here} and the hub cannot be reached ({type(e).__name__}: "
                          f"{e}); download it first or give a local directory") from None


def check_model(path: str, field: str) -> None:
    """A local directory with config.json and weights, or a hub model name."""
    local = Path(path)
    if not local.exists():
        if not _is_hub_name(path):
            raise ConfigError(f"{field}: directory {path!r} not found, and it is no hub model "
                              "name either; fix the path")
        _check_hub(path, field, "model", ("config.json",))
        return
    if not local.is_dir():
        raise ConfigError(f"{field}: {path!r} is a file; give the directory written by "
                          "save_pretrained (config.json and weights) or a hub model name")
    if not (local / "config.json").is_file():
        raise ConfigError(f"{field}: {path!r} has no config.json, so it is not a model "
                          "directory written by save_pretrained; point it at one")
    for index in sorted(local.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{field}: weight index {str(index)!r} is unreadable "
                              f"({type(e).__name__}: {e}); export the model again") from None
        missing = sorted(s for s in shards if not (local / s).is_file())
        if missing:
            raise ConfigError(f"{field}: {path!r} lacks {len(missing)} weight file(s) that "
                              f"{index.name} lists, e.g. {missing[0]!r}; copy the whole model "
                              "directory")
    if not (list(local.glob("*.safetensors")) or list(local.glob("pytorch_model*.bin"))):
        raise ConfigError(f"{field}: {path!r} has config.json but no weights (*.safetensors or "
                          "pytorch_model*.bin); copy the weights there or export the model "
                          "again")


def check_gguf(model: ModelConfig, name: str) -> None:
    """`name.gguf_file` names a GGUF file in `name.path`, and transformers can read it."""
    field = f"{name}.gguf_file"
    if model.path is None:
        raise ConfigError(f"{field}: set {name}.path too, the directory (or hub repo) holding "
                          f"{model.gguf_file!r}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{field}: reading a GGUF checkpoint needs the gguf package, which is "
                          "not installed: pip install -e \".[smol]\" (or pip install gguf)")
    local = Path(model.path)
    if local.is_dir():
        if not (local / model.gguf_file).is_file():
            found = sorted(p.name for p in local.glob("*.gguf"))
            raise ConfigError(f"{field}: no file {model.gguf_file!r} in {model.path!r} (its "
                              f".gguf files: {found}); fix the name or {name}.path")
    elif _is_hub_name(model.path):
        _check_hub(model.path, f"{name}.path", "model", (model.gguf_file,))
    else:
        raise ConfigError(f"{name}.path: directory {model.path!r} not found, and it is no hub "
                          "model name either; fix the path")


def check_tokenizer(path: str, field: str) -> None:
    """A local directory with tokenizer files, or a hub name."""
    local = Path(path)
    if not local.exists():
        if not _is_hub_name(path):
            raise ConfigError(f"{field}: directory {path!r} not found, and it is no hub "
                              "tokenizer name either; fix the path")
        _check_hub(path, field, "tokenizer", TOKENIZER_FILES)
        return
    if not local.is_dir() or not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{field}: {path!r} holds no tokenizer (none of "
                          f"{', '.join(TOKENIZER_FILES)}); give a directory written by "
                          "tokenizer.save_pretrained or a hub name")


def check_dataset(path: str, name: str) -> None:
    """A readable, decodable local file, a local directory, or a hub dataset. `name` is how
    errors name the dataset (data.sources.where)."""
    local = Path(path)
    if local.is_dir():  # save_to_disk output or a directory of data files: datasets reads it
        require("datasets", f"{name}: a save_to_disk folder or a directory of data files",
                DataError)
        return
    if local.is_file() or local.suffix in FILE_SUFFIXES or not _is_hub_name(path):
        if not local.is_file():
            raise DataError(f"{name}: file not found; fix the path")
        try:
            with local.open("rb") as f:
                if local.suffix == ".parquet":
                    _check_parquet(f, name)
                    require("pyarrow", f"{name}: a .parquet file", DataError)
                elif local.suffix in FILE_SUFFIXES:
                    check_utf8(f, name)
        except OSError as e:
            raise DataError(f"{name}: cannot be read ({e.strerror or e}); check its "
                            "permissions") from None
        return
    require("datasets", f"{name}: a hub dataset", DataError)
    _check_hub_dataset(path, name)


def _check_parquet(f, name: str) -> None:
    if f.read(4) != b"PAR1":
        raise DataError(f"{name}: not a parquet file (it does not start with the PAR1 magic "
                        "bytes); write it with pandas.to_parquet / pyarrow, or rename it")


def check_utf8(f, name: str) -> None:
    """Decode the binary file object `f` as UTF-8, a chunk at a time; a failure names the
    byte, its offset and line, and what the file looks like instead."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, first = 0, 0, b""
    while True:
        chunk = f.read(CHUNK)
        if not first:
            first = chunk[:8192]
        try:
            decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            at = max(e.start, 0)
            bad = chunk[at:at + 1] or b"?"
            line = lines + chunk[:at].count(b"\n") + 1
            raise DataError(
                f"{name}: not UTF-8 text: byte {bad[0]:#04x} at offset {offset + at} (line "
                f"{line}) is not valid UTF-8{_looks_like(first)}; ds_rlhf reads .json, .jsonl "
                "and .csv files as UTF-8: convert it (e.g. iconv -f latin1 -t utf-8)") from None
        if not chunk:
            return
        offset += len(chunk)
        lines += chunk.count(b"\n")


def _looks_like(head: bytes) -> str:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "; the file is UTF-16 (it starts with a UTF-16 byte-order mark)"
    if b"\x00" in head:
        return "; the file looks binary (it holds NUL bytes), not text"
    return "; the file is in another encoding (latin-1 / cp1252?)"


def _check_hub_dataset(path: str, name: str) -> None:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return  # `datasets` may hold it in its own cache; load_dataset says if not
    try:
        HfApi().dataset_info(path, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise DataError(f"{name}: no such local file or directory, and the hub has no dataset "
                        "of that name (or it is private: log in with huggingface-cli login); "
                        "fix the path") from None
    except Exception:  # no network or another hub error: load_dataset may find it cached
        return
