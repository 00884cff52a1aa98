"""The optional logging sinks (gsae_fast.sinks): TensorBoard event files read back with the values
logged; a W&B run in offline mode writes its run folder (no network) and a resumed training
continues the same run; a missing package is one line naming the extra to install."""
import sys

import pytest

from gsae_fast.sinks import WANDB_ID_FILE, numeric_fields, open_sinks

RECORDS = [{"step": s, "loss": 1.0 / (s + 1), "l0": 30 + s, "phase": "train", "resumed": False}
           for s in range(0, 30, 10)]


def test_numeric_fields():
    assert numeric_fields({"step": 3, "loss": 0.5, "l0": 7, "name": "a", "done": True,
                           "nothing": None}) == {"loss": 0.5, "l0": 7.0}


def test_no_sink_asked_for(tmp_path):
    assert open_sinks(tensorboard=None, wandb_project=None, run_dir=str(tmp_path),
                      config={}) == []


def test_tensorboard_event_files_hold_the_values(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard not installed (pip install gsae_fast[tensorboard])")
    log_dir = tmp_path / "tb"
    sinks = open_sinks(tensorboard=str(log_dir), wandb_project=None, run_dir=str(tmp_path),
                       config={"lr": 1e-3, "arch": "topk"})
    for record in RECORDS:
        for sink in sinks:
            sink.log(record)
    for sink in sinks:
        sink.close()
    events = event_accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["l0", "loss"]  # text and booleans left out
    for name in ("loss", "l0"):
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert got == [(r["step"], pytest.approx(r[name])) for r in RECORDS]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install gsae_fast[wandb])")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"

    def train(records, resume):
        sinks = open_sinks(tensorboard=None, wandb_project="gsae-test", run_dir=str(run_dir),
                           config={"lr": 1e-3}, name="test-run", resume=resume)
        assert sinks[0].run.settings.mode == "offline"
        for record in records:
            sinks[0].log(record)
        sinks[0].close()
        return sinks[0].run.id

    first = train(RECORDS[:2], resume=False)
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == first
    assert train(RECORDS[2:], resume=True) == first  # the same run continues
    folders = sorted((tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{first}"))
    assert len(folders) == 2
    for folder in folders:
        assert (folder / f"run-{first}.wandb").stat().st_size > 0
    assert train(RECORDS[:1], resume=False) != first  # a new training, a new run


@pytest.mark.parametrize("module, kwargs, extra", [
    ("torch.utils.tensorboard", dict(tensorboard="tb", wandb_project=None), "tensorboard"),
    ("wandb", dict(tensorboard=None, wandb_project="p"), "wandb"),
])
def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, module, kwargs, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ImportError, match=rf"pip install gsae_fast\[{extra}\]$"):
        open_sinks(run_dir=str(tmp_path), config={}, **kwargs)
