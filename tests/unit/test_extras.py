"""The optional packages (setup.cfg's hub, wandb and plot extras; ds_rlhf/extras.py): the core
install lacks them, and a run that needs a missing one stops with one line naming the extra,
before any engine is built. A missing package is simulated with sys.modules[name] = None,
which makes both its import and importlib's lookup fail as if it were not installed."""

from __future__ import annotations

import configparser
import json
import sys

import pytest

from ds_rlhf.checks import check_dataset
from ds_rlhf.cli import main
from ds_rlhf.config import ConfigError, DataError, DatasetSpec, TrackingConfig, UserInputError
from ds_rlhf.data.sources import read_split
from ds_rlhf.extras import EXTRA
from ds_rlhf.plot import plot_metrics
from ds_rlhf.tracking import Tracker
from tests.conftest import REPO, ppo_config, write_yaml


def _fix(extra: str) -> str:
    return f"install the `{extra}` extra (bash launch/install.sh {extra}, or pip install -e"


def _missing(monkeypatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def _ppo_fails(assets, tmp_path, capsys, **sections) -> str:
    """`ds-rlhf ppo` on the tiny config: exit 2, one line, nothing written to output_dir."""
    out = tmp_path / "out"
    cfg = write_yaml(ppo_config(assets, out, **sections), tmp_path / "run.yaml")
    capsys.readouterr()
    assert main(["ppo", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert not out.exists()  # stopped before the engines (and the tracker) were made
    return err


def test_core_install_lacks_the_optional_packages_and_full_has_them():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    core = cfg["options"]["install_requires"]
    extras = {name: value.split() for name, value in cfg["options.extras_require"].items()}
    for module, extra in EXTRA.items():
        assert module not in core
        assert any(req.startswith(module) for req in extras[extra]), (module, extra)
    assert extras["full"] == [f"ds-rlhf[{','.join(dict.fromkeys(EXTRA.values()))}]"]


def test_wandb_project_without_wandb(assets, tmp_path, capsys, monkeypatch):
    _missing(monkeypatch, "wandb")
    err = _ppo_fails(assets, tmp_path, capsys, tracking={"wandb_project": "rlhf"})
    assert "tracking.wandb_project needs the wandb package, which is not installed" in err
    assert _fix("wandb") in err
    # the tracker says the same where no check ran before it
    with pytest.raises(ConfigError, match="install the `wandb` extra"):
        Tracker(tmp_path / "t", True, 1, 1, tracking=TrackingConfig(wandb_project="rlhf"))
    Tracker(tmp_path / "t", True, 1, 1, tracking=TrackingConfig())  # W&B off: no wandb needed


def test_save_to_disk_folder_and_hub_dataset_without_datasets(assets, tmp_path, capsys,
                                                              monkeypatch):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    _missing(monkeypatch, "datasets")
    err = _ppo_fails(assets, tmp_path, capsys,
                     data={"datasets": [{"path": str(saved), "format": "prompt"}]})
    assert f"dataset {str(saved)!r} (data.datasets[0]): a save_to_disk folder" in err
    assert "needs the datasets package" in err and _fix("hub") in err
    # a hub name: named before any request to the hub
    with pytest.raises(DataError, match="a hub dataset needs the datasets package.*`hub` extra"):
        check_dataset("HuggingFaceH4/ultrafeedback_binarized", "dataset (data.datasets[0])")
    # read_split, where no check ran before it
    for path in (saved, "HuggingFaceH4/ultrafeedback_binarized"):
        with pytest.raises(DataError, match="needs the datasets package.*`hub` extra"):
            read_split(DatasetSpec(path=str(path)), 0, "train")


def test_parquet_file_without_pyarrow(assets, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a b", "c d"]}), path)
    _missing(monkeypatch, "pyarrow", "pyarrow.parquet")
    err = _ppo_fails(assets, tmp_path, capsys,
                     data={"datasets": [{"path": str(path), "format": "prompt"}]})
    assert "a .parquet file needs the pyarrow package" in err and _fix("hub") in err
    with pytest.raises(DataError, match="a .parquet file needs the pyarrow package"):
        read_split(DatasetSpec(path=str(path)), 0, "train")


def test_json_lines_need_no_optional_package(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    _missing(monkeypatch, *EXTRA)
    check_dataset(str(path), "dataset")
    assert read_split(DatasetSpec(path=str(path)), 0, "train").num_rows == 2


def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 0.5}) + "\n")
    _missing(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(UserInputError, match="ds-rlhf plot needs the matplotlib package"):
        plot_metrics(tmp_path)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and _fix("plot") in err
    assert not (tmp_path / "metrics.png").exists()
