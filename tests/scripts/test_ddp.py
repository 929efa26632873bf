"""Classification and segmentation under Lightning DDP: 2 CPU processes (gloo), tiny sizes.

Each run must finish and write one set of outputs, as a single-process run does: one
``metrics.json``, one ``backbone.pt``, TensorBoard events from one process only, one
``last.ckpt``; rank 1 writes nothing of its own. With ``cache=memory`` each rank caches only
its share of the cohort. (DINO's DDP test is in tests/scripts/test_dino.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medssl.models.weights import load_backbone
from tests.conftest import REPO
from tests.scripts.test_classification import TINY_CLS
from tests.scripts.test_segmentation import TINY_SEG

CASES = [
    # Validation and test folds must differ (the cohort check refuses a fold in both); 3 test
    # rows, one evaluated per step: one rank's share is padded with a repeat.
    pytest.param("downstream/classification.py", "cls_demo", "classification_csv",
                 [*(o for o in TINY_CLS if not o.startswith(("devices=", "val_folds=",
                                                             "test_folds="))),
                  "val_folds=[4]", "test_folds=[0,3]", "eval_batch_size=1",
                  "class_weights=none"],
                 id="classification"),
    # 3 validation and 3 test volumes: each rank's share is padded with a repeated case.
    pytest.param("downstream/segmentation.py", "seg_demo", "segmentation_csv",
                 [*(o for o in TINY_SEG if not o.startswith(("devices=", "batch_size="))),
                  "batch_size=1"], id="segmentation"),
]
SEGMENTATION_FOLDS = ["train", "train", "val", "val", "val", "test", "test", "test"]


def _scalar(folder: Path, tag: str) -> float:
    """The last value of a TensorBoard scalar in the run's event files."""
    values = []
    for path in sorted(folder.rglob("events.out.tfevents*")):
        events = EventAccumulator(str(path))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values += [e.value for e in events.Scalars(tag)]
    return values[-1]


@pytest.mark.parametrize(("script", "experiment", "csv", "tiny"), CASES)
def test_two_cpu_processes_write_one_set_of_outputs(demo, tmp_path: Path, script: str,
                                                    experiment: str, csv: str,
                                                    tiny: list[str]) -> None:
    csv_path = Path(getattr(demo, csv))
    if experiment == "seg_demo":
        table = pd.read_csv(csv_path)
        for column in ("img_path", "seg_path"):
            table[column] = [str(csv_path.parent / p) for p in table[column]]
        table["fold"] = SEGMENTATION_FOLDS
        csv_path = tmp_path.parent / f"{tmp_path.name}_odd_folds.csv"
        table.to_csv(csv_path, index=False)
    result = subprocess.run(
        [sys.executable, str(REPO / script), *tiny, "devices=2", "n_epochs=1",
         f"results_dir={tmp_path}", f"csv_path={csv_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # cache=memory: each rank knew its rank before setup and cached only its share.
    for rank in (0, 1):
        assert f"rank {rank} of 2 caches and serves its share" in result.stdout + result.stderr
    out = tmp_path / experiment
    assert [p.name for p in tmp_path.iterdir()] == [experiment]  # one run folder
    metrics = list(out.rglob("metrics.json"))
    assert len(metrics) == 1, metrics
    report = json.loads(metrics[0].read_text())  # a complete, parseable report
    if experiment == "cls_demo":
        # test/loss counts each row once: the cross-entropy of the written predictions (the
        # padded repeat used to be averaged in).
        predictions = pd.read_csv(metrics[0].parent / "predictions.csv", dtype=str,
                                  keep_default_na=False)
        assert len(predictions) == 3
        hparams = torch.load(next(out.rglob("last.ckpt")), weights_only=True)["hyper_parameters"]
        total = 0.0
        for target, classes in hparams["classes"].items():
            known = predictions[target] != ""
            probs = predictions.loc[known, [f"{target}_prob_{c}" for c in classes]]
            labels = torch.tensor([classes.index(v) for v in predictions.loc[known, target]])
            total += torch.nn.functional.nll_loss(
                torch.tensor(probs.astype(float).to_numpy()).log(), labels).item()
        assert _scalar(out, "test/loss") == pytest.approx(total, rel=1e-4)
    if experiment == "seg_demo":
        # The logged test Dice counts each case once, as the per-case report does (the padded
        # repeat used to count twice); metrics.csv lists the cases in CSV order.
        assert report["n_cases"] == 3
        assert _scalar(out, "test/dice") == pytest.approx(report["dice"], abs=1e-6)
        cases = pd.read_csv(metrics[0].parent / "metrics.csv")
        assert list(dict.fromkeys(cases.PatientID)) == ["DEMO006", "DEMO007", "DEMO008"]
    assert [p.relative_to(out) for p in out.rglob("backbone.pt")] == [Path("backbone.pt")]
    _, report = load_backbone(out / "backbone.pt")
    assert report.complete
    # events.out.tfevents.<time>.<host>.<pid>.<n>: every event file from one process (rank 0
    # may open more than one writer; no other rank may write any).
    events = list(out.rglob("events.out.tfevents*"))
    assert events and len({e.name.split(".")[-2] for e in events}) == 1, events
    checkpoints = list(out.rglob("last.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    # Both ranks trained: the step count is the per-rank share of the training rows.
    assert torch.load(checkpoints[0], weights_only=True)["global_step"] >= 1
    assert "rank" not in " ".join(p.name for p in out.rglob("*"))
