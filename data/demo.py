"""Synthetic knee-MRI-like demo cohort: DICOM series, NIfTI, label maps and task CSVs.

Each subject is a sagittal series (one DICOM file per slice, like OAI knee MRI) of a
phantom with femur, tibia and their cartilage plates inside soft tissue. Bone size
depends on the subject's sex and cartilage thickness/brightness on the cohort, so
both targets can be learned from the image (the DICOM headers do not reveal them).

Run ``medssl-demo [OUT_DIR]`` or ``python -m medssl.data.demo [OUT_DIR]``.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset

log = logging.getLogger(__name__)

DEMO_VERSION = 1
DEFAULT_DIR = Path("demo_data")  # relative to the working directory (the repo root)
LABELS = {0: "background", 1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage"}
COHORTS = ("1: Progression", "3: Non-exposed control group")
SEXES = ("1: Male", "2: Female")
IOP_SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows run anterior->posterior, columns downwards
SEG_SPLIT = {"train": 0.67, "val": 0.165}  # the rest is test
N_FOLDS = 5


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines the generated files (kept in ``demo.json``)."""

    n_subjects: int = 24
    rows: int = 64
    columns: int = 64
    slices: int = 32
    pixel_spacing: float = 2.2  # mm
    slice_step: float = 3.0  # mm between slice positions
    seed: int = 0
    version: int = DEMO_VERSION


@dataclass
class DemoPaths:
    root: Path

    @property
    def ssl_csv(self) -> Path:
        return self.root / "ssl.csv"

    @property
    def classification_csv(self) -> Path:
        return self.root / "classification.csv"

    @property
    def segmentation_csv(self) -> Path:
        return self.root / "segmentation.csv"

    @property
    def mae3d_csv(self) -> Path:
        return self.root / "mae3d.csv"

    @property
    def mae2d_csv(self) -> Path:
        return self.root / "mae2d.csv"


def _world_grid(spec: DemoSpec, origin: np.ndarray) -> np.ndarray:
    """LPS coordinates (mm) of every voxel of the (columns, rows, slices) grid."""
    j, i, k = np.meshgrid(np.arange(spec.columns), np.arange(spec.rows), np.arange(spec.slices),
                          indexing="ij")
    row_dir, col_dir = np.array(IOP_SAGITTAL[:3]), np.array(IOP_SAGITTAL[3:])
    slice_dir = np.array([1.0, 0.0, 0.0])  # instance order runs towards patient left
    return (origin + j[..., None] * spec.pixel_spacing * row_dir
            + i[..., None] * spec.pixel_spacing * col_dir
            + k[..., None] * spec.slice_step * slice_dir)


def phantom(spec: DemoSpec, rng: np.random.Generator, male: bool, progression: bool,
            origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image (float, MR-like units) and label map on the (columns, rows, slices) grid."""
    xyz = _world_grid(spec, origin)
    lr, ap, si = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    scale = (1.1 if male else 0.9) + rng.normal(0, 0.03)
    cart_f = (2.5 if progression else 5.0) + rng.normal(0, 0.4)
    cart_t = (2.0 if progression else 4.0) + rng.normal(0, 0.3)
    gap = 2.0 + rng.uniform(0, 1)
    centre = rng.normal(0, 2.0, size=3)
    lr, ap, si = lr - centre[0], ap - centre[1], si - centre[2]
    rf = np.array([34.0, 24.0, 19.0]) * scale  # femoral condyle radii (LR, AP, SI)
    femur_si = gap / 2 + cart_f + rf[2]

    def ellipsoid(radii: np.ndarray, c_si: float) -> np.ndarray:
        return (lr / radii[0]) ** 2 + (ap / radii[1]) ** 2 + ((si - c_si) / radii[2]) ** 2

    femur = (ellipsoid(rf, femur_si) < 1) | (
        (np.abs(ap) < 11 * scale) & (np.abs(lr) < 14 * scale) & (si > femur_si))
    femur_cart = (ellipsoid(rf + cart_f, femur_si) < 1) & ~femur & (si < femur_si - 4)
    footprint = (lr / (32 * scale)) ** 2 + (ap / (26 * scale)) ** 2 < 1
    tibia_top = -gap / 2 - cart_t
    plateau = footprint & (si < tibia_top) & (si > tibia_top - 18 * scale)
    shaft = ((ap / (13 * scale)) ** 2 + (lr / (15 * scale)) ** 2 < 1) & (si < tibia_top)
    tibia = plateau | shaft
    tibia_cart = footprint & (si >= tibia_top) & (si < -gap / 2) & ((lr / 30) ** 2 < 0.8)
    tissue = (lr / (58 * scale)) ** 2 + (ap / (48 * scale)) ** 2 < 1

    label = np.zeros(lr.shape, dtype=np.uint8)
    label[femur], label[femur_cart], label[tibia], label[tibia_cart] = 1, 2, 3, 4
    level = {
        "tissue": 220 + rng.normal(0, 15),
        "bone": 330 + rng.normal(0, 25),
        "cartilage": (820 if progression else 640) + rng.normal(0, 40),
    }
    image = np.where(tissue, level["tissue"], 0.0)
    image[femur | tibia] = level["bone"]
    image[femur_cart | tibia_cart] = level["cartilage"]
    image = _smooth(image)
    bias = 1 + 0.12 * (si / 80) + 0.05 * (ap / 80)
    image = image * bias * rng.uniform(0.85, 1.2)
    noise = rng.normal(0, 12, size=(2, *image.shape))
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # Rician, like magnitude MR
    return image, label


def _smooth(a: np.ndarray) -> np.ndarray:
    """Partial-volume blur: a [1, 2, 1] / 4 kernel along each axis."""
    for axis in range(a.ndim):
        a = (np.roll(a, 1, axis) + 2 * a + np.roll(a, -1, axis)) / 4
    return a


def _uid(spec: DemoSpec, *parts: object) -> str:
    return pydicom.uid.generate_uid(entropy_srcs=[str(spec), *map(str, parts)])


def write_dicom_series(folder: Path, raw: np.ndarray, slope: float, intercept: float,
                       origin: np.ndarray, spec: DemoSpec, pid: str,
                       rng: np.random.Generator) -> None:
    """One file per slice; file names are shuffled so name order is not slice order."""
    folder.mkdir(parents=True)
    study, series = _uid(spec, pid, "study"), _uid(spec, pid, "series")
    frame_of_ref = _uid(spec, pid, "for")
    names = rng.permutation(spec.slices)
    for k in range(spec.slices):
        sop = _uid(spec, pid, "sop", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.MRImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.Modality = "MR"
        ds.PatientID = pid
        ds.PatientName = "ANONYMOUS"
        ds.SeriesDescription = "SAG_3D_DESS_DEMO"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        position = origin + np.array([k * spec.slice_step, 0.0, 0.0])
        ds.ImagePositionPatient = [f"{v:.5f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.1f}" for v in IOP_SAGITTAL]
        ds.PixelSpacing = [f"{spec.pixel_spacing:.5f}"] * 2
        # Like real scans, the nominal thickness differs from the slice step.
        ds.SliceThickness = f"{spec.slice_step * 0.8:.4f}"
        ds.SpacingBetweenSlices = f"{spec.slice_step:.4f}"
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.Rows, ds.Columns = spec.rows, spec.columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(raw[:, :, k].T).astype("<u2").tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}", enforce_file_format=True)


def generate(out_dir: str | Path, spec: DemoSpec = DemoSpec()) -> DemoPaths:
    """Write the cohort into ``out_dir`` (replaced atomically if it exists)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out_dir.parent))
    rng = np.random.default_rng(spec.seed)
    # Balanced design: every (cohort, sex) pair equally often, in random order.
    design = [(c, s) for c in range(len(COHORTS)) for s in range(len(SEXES))]
    design = [design[i % len(design)] for i in rng.permutation(spec.n_subjects)]
    n_train = round(SEG_SPLIT["train"] * spec.n_subjects)
    n_val = round(SEG_SPLIT["val"] * spec.n_subjects)
    rows: dict[str, list[list]] = {k: [] for k in ("ssl", "cls", "seg", "mae2d")}
    for n, (cohort, sex) in enumerate(design):
        pid = f"DEMO{n + 1:03d}"
        origin = np.array([-spec.slices * spec.slice_step / 2, -spec.columns * spec.pixel_spacing
                           / 2, spec.rows * spec.pixel_spacing / 2]) + rng.normal(0, 5, 3)
        image, label = phantom(spec, rng, male=sex == 0, progression=cohort == 0, origin=origin)
        slope, intercept = float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([0.0, -100.0]))
        raw = np.clip(np.round((image - intercept) / slope), 0, 65535).astype(np.uint16)
        stored = (raw * slope + intercept).astype(np.float32)  # exactly what the DICOM holds
        write_dicom_series(tmp / "dicom" / pid, raw, slope, intercept, origin, spec, pid, rng)
        # NIfTI of the same grid: voxel axes (columns, rows, slices), LPS -> RAS affine.
        affine = np.eye(4)
        affine[:3, 0] = np.array(IOP_SAGITTAL[:3]) * spec.pixel_spacing
        affine[:3, 1] = np.array(IOP_SAGITTAL[3:]) * spec.pixel_spacing
        affine[:3, 2] = [spec.slice_step, 0, 0]
        affine[:3, 3] = origin
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        (tmp / "nifti").mkdir(exist_ok=True)
        img_rel, seg_rel = f"nifti/{pid}_image.nii.gz", f"nifti/{pid}_label.nii.gz"
        nib.save(nib.Nifti1Image(stored, affine), tmp / img_rel)
        nib.save(nib.Nifti1Image(label, affine), tmp / seg_rel)
        fold = n % N_FOLDS
        split = "train" if n < n_train else "val" if n < n_train + n_val else "test"
        max_val = f"{float(stored.max()):g}"
        rows["ssl"].append([pid, f"dicom/{pid}", fold])
        rows["cls"].append([pid, f"dicom/{pid}", fold, COHORTS[cohort], SEXES[sex]])
        rows["seg"].append([pid, img_rel, seg_rel, split, max_val])
        rows["mae2d"] += [[pid, img_rel, k, fold, max_val] for k in range(spec.slices)]
    _write_csv(tmp / "ssl.csv", ["PatientID", "path", "fold"], rows["ssl"])
    _write_csv(tmp / "mae3d.csv", ["PatientID", "path", "fold"], rows["ssl"])
    _write_csv(tmp / "classification.csv", ["PatientID", "path", "fold", "V00COHORT", "P02SEX"],
               rows["cls"])
    _write_csv(tmp / "segmentation.csv",
               ["PatientID", "img_path", "seg_path", "fold", "max_val"], rows["seg"])
    _write_csv(tmp / "mae2d.csv", ["PatientID", "path", "slice", "fold", "max_val"],
               rows["mae2d"])
    (tmp / "labels.json").write_text(json.dumps(LABELS, indent=1))
    (tmp / "demo.json").write_text(json.dumps(asdict(spec), indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return DemoPaths(out_dir)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def ensure_demo(out_dir: str | Path = DEFAULT_DIR, spec: DemoSpec = DemoSpec()) -> DemoPaths:
    """Return the demo cohort in ``out_dir``, generating it when missing or out of date."""
    out_dir = Path(out_dir)
    manifest = out_dir / "demo.json"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # DDP ranks (or parallel runs) may all get here: one generates, the others wait.
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if manifest.exists() and json.loads(manifest.read_text()) == asdict(spec):
            return DemoPaths(out_dir)
        log.info("Generating the demo cohort in %s", out_dir)
        return generate(out_dir, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    parser.add_argument("--subjects", type=int, default=DemoSpec.n_subjects)
    parser.add_argument("--seed", type=int, default=DemoSpec.seed)
    args = parser.parse_args(argv)
    paths = generate(args.out_dir, DemoSpec(n_subjects=args.subjects, seed=args.seed))
    print(f"Demo cohort of {args.subjects} subjects written to {paths.root}")
    for name in ("ssl", "classification", "segmentation", "mae3d", "mae2d"):
        print(f"  {name + ':':16s}{getattr(paths, name + '_csv')}")


if __name__ == "__main__":
    main()
