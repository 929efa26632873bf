"""The memory cache keeps one preprocessed copy per file and checks that it fits first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import list_data_collate

from medssl.data import cache as data_cache
from medssl.data import io as medssl_io
from medssl.data.demo import DemoPaths
from medssl.data.pipeline import Preprocessing, make_datasets

SMALL = Preprocessing(resize_to=(8, 16, 16))


def _repeated_csv(demo: DemoPaths, path: Path, n_rows: int, n_files: int) -> pd.DataFrame:
    """``n_rows`` rows over the first ``n_files`` demo volumes, one PatientID per row, the
    files shared between folds 0 (train) and 1 (val)."""
    files = pd.read_csv(demo.ssl_csv).path.tolist()[:n_files]
    df = pd.DataFrame({"PatientID": [f"R{i:04d}" for i in range(n_rows)],
                       "path": [str(demo.root / files[i % n_files]) for i in range(n_rows)],
                       "fold": [i % 2 for i in range(n_rows)]})
    df.to_csv(path, index=False)
    return df


def _count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    load = medssl_io.load_volume

    def counting(path: str, *args: object, **kwargs: object) -> medssl_io.Volume:
        calls.append(str(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(medssl_io, "load_volume", counting)
    return calls


def test_memory_cache_preprocesses_each_file_once(demo: DemoPaths, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    df = _repeated_csv(demo, tmp_path / "rep.csv", n_rows=40, n_files=3)
    calls = _count_loads(monkeypatch)
    cached, _ = make_datasets(tmp_path / "rep.csv", "ssl", {"train": 0, "val": 1}, SMALL,
                              cache="memory")
    assert sorted(calls) == sorted(set(df.path))  # once per file, shared by both splits
    calls.clear()
    plain, _ = make_datasets(tmp_path / "rep.csv", "ssl", {"train": 0, "val": 1}, SMALL,
                             validate=False)
    for split, fold in (("train", 0), ("val", 1)):
        expected = df[df.fold == fold]
        assert len(cached[split]) == len(expected)
        for n, (_, row) in enumerate(expected.iterrows()):
            item = cached[split][n]
            assert item["PatientID"] == row.PatientID and f"line {row.name + 2} " in item["row"]
            assert torch.equal(item["image"], plain[split][n]["image"])
    assert len(calls) == len(df)  # without a cache every item is loaded again
    calls.clear()
    item = cached["train"][0]
    item["image"].zero_()  # a consumer writing into its item never changes the cache
    assert float(cached["train"][0]["image"].max()) > 0.5 and not calls


def test_memory_estimate_from_headers(demo: DemoPaths, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _repeated_csv(demo, tmp_path / "rep.csv", n_rows=30, n_files=3)
    seen: list[tuple[int, int]] = []
    fits = data_cache.MemoryCache.check_fits

    def spy(self: data_cache.MemoryCache, *args: object) -> int:
        seen.append((fits(self, *args), self.workers))
        return seen[-1][0]

    monkeypatch.setattr(data_cache.MemoryCache, "check_fits", spy)
    make_datasets(tmp_path / "rep.csv", "ssl", {"train": 0, "val": 1}, SMALL, cache="memory")
    # 3 distinct files of 8x16x16 float32 after resizing, one native 16x32x32 volume per
    # filling thread, and the per-entry allowance; once for both splits.
    volumes = 3 * 8 * 16 * 16 * 4
    native = 32 * 32 * 16 * 4
    (need, workers), = seen
    assert need == volumes + workers * native + 3 * data_cache.ENTRY_OVERHEAD
    make_datasets(tmp_path / "rep.csv", "ssl", {"train": 0}, Preprocessing(), cache="memory")
    assert seen[-1][0] == 3 * native + workers * native + 3 * data_cache.ENTRY_OVERHEAD


def test_memory_cache_that_would_not_fit_stops_before_loading(
        demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _repeated_csv(demo, tmp_path / "rep.csv", n_rows=20, n_files=4)
    need = 4 * 8 * 16 * 16 * 4
    calls = _count_loads(monkeypatch)
    monkeypatch.setattr(data_cache, "available_memory", lambda: need // 2)
    with pytest.raises(MemoryError, match="cache=disk") as err:
        make_datasets(tmp_path / "rep.csv", "ssl", {"train": 0, "val": 1}, SMALL,
                      cache="memory")
    assert "4 distinct volumes (20 rows)" in str(err.value) and not calls
    monkeypatch.setattr(data_cache, "available_memory", lambda: 100 * need)
    make_datasets(tmp_path / "rep.csv", "ssl", {"train": 0, "val": 1}, SMALL, cache="memory")
    assert len(calls) == 4


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_available_memory_respects_a_cgroup_limit(version: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch job's limit on a parent cgroup counts; reclaimable file cache is free."""
    root = tmp_path / "cgroup"
    names = {"v2": ("memory.max", "memory.current", "inactive_file", ""),
             "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file",
                    "memory")}[version]
    limit, usage, cache, controller = names
    base = root / controller if controller else root
    job, step = base / "job_1", base / "job_1" / "step_0"
    step.mkdir(parents=True)
    (job / limit).write_text("1000000\n")
    (job / usage).write_text("400000\n")
    (job / "memory.stat").write_text(f"anon 1\n{cache} 150000\n")
    (step / limit).write_text("max\n" if version == "v2" else "9223372036854771712\n")
    (step / usage).write_text("300000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job_1/step_0\n" if version == "v2" else
                    "5:cpu:/job_1/step_0\n4:memory:/job_1/step_0\n")
    assert data_cache._cgroup_room(proc, root) == 1000000 - 400000 + 150000
    proc.write_text("0::/\n")
    assert data_cache._cgroup_room(proc, root) is None
    monkeypatch.setattr(data_cache, "_cgroup_room", lambda: 12345)
    assert data_cache.available_memory() == 12345
    monkeypatch.setattr(data_cache, "_cgroup_room", lambda: None)
    import psutil

    assert abs(data_cache.available_memory() - psutil.virtual_memory().available) < 2**28


def test_memory_cache_keeps_per_row_max_val(demo: DemoPaths, tmp_path: Path) -> None:
    """Rows reading one file with different scaling are preprocessed separately."""
    df = pd.read_csv(demo.segmentation_csv)
    df = pd.concat([df.iloc[[0]], df.iloc[[0]]]).reset_index(drop=True)
    df["img_path"] = [str(demo.root / p) for p in df.img_path]
    df["seg_path"] = [str(demo.root / p) for p in df.seg_path]
    df["PatientID"] = ["A", "B"]
    df["max_val"] = [100.0, 10000.0]
    df.to_csv(tmp_path / "seg.csv", index=False)
    datasets, _ = make_datasets(tmp_path / "seg.csv", "segmentation", {"train": "train"},
                                Preprocessing(normalize=False), cache="memory")
    raw = datasets["train"][0]["image"].numpy()
    datasets, _ = make_datasets(tmp_path / "seg.csv", "segmentation", {"train": "train"},
                                Preprocessing(), cache="memory")
    for n, max_val in enumerate(df.max_val):
        np.testing.assert_allclose(datasets["train"][n]["image"].numpy(),
                                   np.clip(raw / max_val, 0, 1), atol=1e-6)


def test_disk_cache_batches_mix_new_and_stored_items(demo: DemoPaths, tmp_path: Path) -> None:
    """A batch holding an item computed now and one read back from disk (a file shared by
    rows, or a run resumed within its first epoch) collates, equal to the uncached items."""
    _repeated_csv(demo, tmp_path / "rep.csv", n_rows=8, n_files=2)
    disk, _ = make_datasets(tmp_path / "rep.csv", "ssl", {"train": 0}, SMALL, cache="disk",
                            cache_dir=tmp_path / "cache")
    plain, _ = make_datasets(tmp_path / "rep.csv", "ssl", {"train": 0}, SMALL, validate=False)
    fresh, stored = disk["train"][0], disk["train"][1]  # rows 0 and 2: one file
    assert type(fresh["image"]) is type(stored["image"])
    batch = list_data_collate([fresh, stored, disk["train"][2]])
    for n, image in enumerate(batch["image"]):
        assert torch.equal(image, plain["train"][n]["image"].as_tensor())
