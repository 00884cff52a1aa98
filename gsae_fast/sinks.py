"""Optional places a training run's log records also go: TensorBoard and Weights & Biases.
``log.jsonl`` in the run folder stays the record of the run; these copy its numeric fields.

    sinks = open_sinks(tensorboard="runs/tb", wandb_project=None, run_dir=out, config=cfg)
    for sink in sinks:
        sink.log({"step": 100, "loss": 0.25, "l0": 31.5})
    for sink in sinks:
        sink.close()

TensorBoard needs the ``tensorboard`` package (``pip install gsae_fast[tensorboard]``), W&B the
``wandb`` one (``pip install gsae_fast[wandb]``); each is imported only when its sink is opened.
W&B runs offline (files only, no network; upload later with ``wandb sync``) unless WANDB_MODE
says otherwise.
"""
from __future__ import annotations

import json
import numbers
import os
from typing import Optional

from .files import atomic_write

WANDB_ID_FILE = "wandb_run_id"  # in the run folder: the W&B run a resumed training continues


def numeric_fields(record: dict) -> dict:
    """The fields of a log record worth plotting: numbers (not booleans), without ``step``."""
    return {k: float(v) for k, v in record.items() if k != "step"
            and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoardSink:
    """Scalars in TensorBoard event files under ``log_dir`` (one tag per field), and the run's
    config as text."""

    def __init__(self, log_dir: str, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install "
                              "gsae_fast[tensorboard]") from None
        self.writer = SummaryWriter(log_dir=log_dir)
        # (four spaces: TensorBoard renders the text as Markdown, this keeps it verbatim)
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "))

    def log(self, record: dict) -> None:
        step = int(record["step"])
        for name, value in numeric_fields(record).items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run in ``project``: offline unless WANDB_MODE is set; its files under
    ``run_dir/wandb`` unless WANDB_DIR is set. The run's id is kept in ``run_dir``, so that a
    resumed training (``resume``) continues the same W&B run."""

    def __init__(self, project: str, run_dir: str, config: dict, name: Optional[str] = None,
                 resume: bool = False):
        try:
            import wandb
        except ImportError:
            raise ImportError("--wandb needs the wandb package: pip install "
                              "gsae_fast[wandb]") from None
        id_path = os.path.join(run_dir, WANDB_ID_FILE)
        run_id = None
        if resume and os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip() or None
        os.makedirs(run_dir, exist_ok=True)
        # create_new: several runs may be open in one process (a sweep), none ends another.
        self.run = wandb.init(
            project=project, name=name, config=config, id=run_id,
            resume="allow" if run_id is not None else None, reinit="create_new",
            mode=None if "WANDB_MODE" in os.environ else "offline",
            dir=None if "WANDB_DIR" in os.environ else run_dir)
        if run_id is None:
            with atomic_write(id_path, "w") as f:
                f.write(self.run.id + "\n")

    def log(self, record: dict) -> None:
        self.run.log(numeric_fields(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def open_sinks(*, tensorboard: Optional[str], wandb_project: Optional[str], run_dir: str,
               config: dict, name: Optional[str] = None, resume: bool = False) -> list:
    """The sinks asked for: TensorBoard event files in the folder ``tensorboard``, a W&B run in
    ``wandb_project`` (``name``: its display name; ``resume``: continue the run of ``run_dir``);
    an empty list when neither is. Each has ``log(record)`` (a log record: ``step`` and fields;
    fields that are not numbers are left out) and ``close()``. A missing package raises
    ImportError naming the extra to install, with no sink left open."""
    sinks = []
    try:
        if tensorboard is not None:
            sinks.append(TensorBoardSink(tensorboard, config))
        if wandb_project is not None:
            sinks.append(WandbSink(wandb_project, run_dir, config, name=name, resume=resume))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
