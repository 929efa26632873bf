"""Frozen-feature probes: how much a backbone's features know about a target, beside raw voxels.

For each feature source (raw voxels, shape descriptors of binary masks, a ``backbone.pt``
export or any file ``load_backbone`` reads, a randomly initialised backbone per seed) it
embeds the train/val/test splits of a cohort CSV, read and preprocessed exactly as training
reads them (``make_datasets``), and reports on the test split:

- k-NN: DINO's weighted vote (k=20, cosine, exp(cos / 0.07)), scores = vote shares;
- linear probe: scikit-learn logistic regression on standardised features, C chosen on the
  val split (ROC AUC for two classes, balanced accuracy otherwise), fitted on train;

with ROC AUC (one-vs-rest macro for several classes), accuracy and balanced accuracy.
``--label-fraction 0.1 --subset-seeds 0 1 2`` fits both probes on the seeded, stratified
training subsets that ``label_fraction=0.1 seed=S`` gives the classification script.

    python bench/probe.py COHORT.csv --target label --resize-to 32 32 32 --raw \\
        --backbone results/dino/backbone.pt \\
        --random-init '{name: vit, patch_size: [8, 8, 8], hidden_size: 192, mlp_dim: 768,
                        num_layers: 2, num_heads: 3}' --seeds 0 1 2 --vit-features cls mean

The CSV is in the classification format (``PatientID,path,fold,<target>``), e.g. what
``medssl-from-medmnist`` writes; ``--train-folds/--val-folds/--test-folds`` pick its splits.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy.ndimage import binary_erosion, generate_binary_structure
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch import nn

from medssl.data.pipeline import IMAGE, Preprocessing, make_datasets
from medssl.models.backbones import build_backbone
from medssl.models.monitors import knn_votes
from medssl.models.weights import load_backbone
from medssl.run.classification import label_subset

log = logging.getLogger("probe")

SPLITS = ("train", "val", "test")
VIT_FEATURES = ("cls", "mean", "both")
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))  # inverse L2 strengths tried on val


@dataclass
class Split:
    """One split's preprocessed inputs and labels."""

    images: torch.Tensor  # (N, C, *spatial) float32, as the network sees them
    labels: np.ndarray  # (N,) class indices


@dataclass
class ProbeResult:
    """Test-split metrics of one feature source."""

    source: str
    features: str
    seed: int | None
    dim: int
    knn: dict[str, float]
    linear: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)
    label_fraction: float = 1.0
    subset_seed: int | None = None  # label_subset's seed when label_fraction < 1


def load_splits(csv_path: str | Path, target: str, resize_to: Sequence[int],
                folds: Mapping[str, Sequence[int | str]]) -> tuple[dict[str, Split], list[str]]:
    """Read every split through the training data path, without augmentation.

    Args:
        csv_path: classification CSV.
        target: the target column.
        resize_to: preprocessing size (X, Y, Z).
        folds: split name (train/val/test) -> CSV fold values.

    Returns:
        the splits and the target's categories (class i is ``categories[i]``).
    """
    datasets, cohort = make_datasets(csv_path, "classification", dict(folds),
                                     Preprocessing(resize_to=tuple(resize_to)), targets=[target])
    # Targets come from the validated rows (encoded there); items carry each row's ``row`` id
    # (a target column may be called "label", a name items keep for label maps).
    encoded = {r["row"]: int(r[target]) for r in cohort.records}
    out = {}
    for name, dataset in datasets.items():
        items = [dataset[i] for i in range(len(dataset))]
        images = torch.stack([_plain(item[IMAGE]) for item in items])
        out[name] = Split(images, np.array([encoded[item["row"]] for item in items]))
    return out, cohort.encodings[target]


def _plain(x: torch.Tensor) -> torch.Tensor:
    return (x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)).float()


SHAPE_DESCRIPTORS = ("log_volume", "inertia_1", "inertia_2", "inertia_3", "elongation",
                     "flatness", "extent_0", "extent_1", "extent_2", "mirror_asymmetry_0",
                     "mirror_asymmetry_1", "mirror_asymmetry_2", "surface_ratio")
FACE_NEIGHBOURS = generate_binary_structure(3, 1)  # 6-connectivity


def shape_descriptors(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hand-crafted geometry of binary masks (N, 1, X, Y, Z) -> (N, 13), a non-deep baseline.

    Per mask (voxels > ``threshold``): log voxel count; the eigenvalues of the voxel
    coordinates' covariance (largest first), elongation (largest / smallest) and flatness
    (middle / smallest); the bounding-box extent per axis; the share of voxels that differ
    from the mask mirrored along each axis (about its own array centre); and the surface
    voxels (a 6-neighbour outside) over volume^(2/3). Order: ``SHAPE_DESCRIPTORS``.
    """
    if images.ndim != 5 or images.shape[1] != 1:
        raise ValueError(f"shape descriptors need masks (N, 1, X, Y, Z), got {tuple(images.shape)}")
    out = []
    for i, mask in enumerate(images[:, 0] > threshold):
        count = int(mask.sum())
        if count < 2:
            raise ValueError(f"mask {i} has {count} voxels > {threshold}: shape descriptors "
                             "need at least 2 foreground voxels per mask")
        coords = mask.nonzero().double()
        eig = torch.linalg.eigvalsh(torch.cov(coords.T, correction=0)).flip(0).clamp_min(1e-6)
        extent = coords.amax(0) - coords.amin(0) + 1
        mirror = [float((mask != mask.flip(a)).sum()) / count for a in range(3)]
        # Interior: voxels whose six face neighbours are all inside (the border is outside).
        surface = count - int(binary_erosion(mask.numpy(), FACE_NEIGHBOURS).sum())
        out.append([np.log(count), *eig.tolist(), float(eig[0] / eig[2]),
                    float(eig[1] / eig[2]), *extent.tolist(), *mirror, surface / count ** (2 / 3)])
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def embed(backbone: nn.Module, images: torch.Tensor, vit_features: str = "cls",
          batch_size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """Frozen features (N, D) of ``images`` (N, C, *spatial), in eval mode.

    Args:
        backbone: a ``medssl.models.backbones`` model.
        images: preprocessed inputs.
        vit_features: for ViTs, ``cls`` (the CLS token, what ``forward`` returns), ``mean``
            (mean of the patch tokens) or ``both`` (concatenated); other backbones only
            support ``cls``, meaning their pooled ``forward`` output.
        batch_size: inputs per forward pass.
        device: where to run.
    """
    if vit_features not in VIT_FEATURES:
        raise ValueError(f"vit_features must be one of {VIT_FEATURES}, got {vit_features!r}")
    has_tokens = hasattr(backbone, "forward_tokens")
    if vit_features != "cls" and not has_tokens:
        raise ValueError(f"vit_features={vit_features!r} needs a ViT (patch tokens); "
                         f"{type(backbone).__name__} only gives pooled features: use 'cls'")
    backbone = backbone.to(device).eval()
    feats = []
    for batch in images.split(batch_size):
        batch = batch.to(device)
        if vit_features == "cls":
            feats.append(backbone(batch).float().cpu())
            continue
        tokens = backbone.forward_tokens(batch).float()
        cls, mean = tokens[:, 0], tokens[:, 1:].mean(1)
        feats.append((mean if vit_features == "mean" else torch.cat([cls, mean], 1)).cpu())
    return torch.cat(feats)


def classification_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC AUC, accuracy and balanced accuracy of class scores (N, K); argmax predicts."""
    predictions = scores.argmax(1)
    if scores.shape[1] == 2:
        auc = roc_auc_score(labels, scores[:, 1])
    else:
        auc = roc_auc_score(labels, scores, multi_class="ovr", labels=np.arange(scores.shape[1]))
    return {"auc": float(auc), "accuracy": float(accuracy_score(labels, predictions)),
            "balanced_accuracy": float(balanced_accuracy_score(labels, predictions))}


def knn_probe(train: tuple[torch.Tensor, np.ndarray], test: tuple[torch.Tensor, np.ndarray],
              n_classes: int, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """DINO's weighted k-NN (``medssl.models.monitors.knn_votes``): train is the bank."""
    shares = knn_votes(train[0], torch.as_tensor(train[1]), test[0], n_classes, k=k,
                       temperature=temperature)
    return classification_metrics(test[1], shares.numpy())


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], n_classes: int,
                 cs: Sequence[float] = DEFAULT_CS, max_iter: int = 1000
                 ) -> tuple[dict[str, float], list[str]]:
    """Logistic regression on standardised features; C picked on val, model fitted on train.

    The val criterion is ROC AUC for two classes and balanced accuracy otherwise (accuracy
    rewards predicting the majority class); ties keep the smaller C (stronger L2).

    With more features than training samples (raw voxels), features are first expressed in
    a basis of the training samples' span: the L2-penalised optimum lies in that span (an
    orthogonal part changes no training logit and only adds penalty), so the fit, val and
    test scores are the same, on an (N, N) problem instead of (N, D).

    Returns:
        the test metrics plus ``C`` and ``val_<criterion>``, and notes (e.g. fits that hit
        ``max_iter``).
    """
    if not cs:
        raise ValueError("cs must list at least one C to try")
    scaler = StandardScaler().fit(train[0])
    x_train, x_val, x_test = (scaler.transform(x) for x in (train[0], val[0], test[0]))
    if x_train.shape[1] > x_train.shape[0]:
        x_train, x_val, x_test = _training_span(x_train, x_val, x_test)
    criterion = "auc" if n_classes == 2 else "balanced_accuracy"
    best: tuple[float, float, LogisticRegression] | None = None
    unconverged = []
    # Ascending C with warm starts: each fit starts from the more regularised solution.
    model = LogisticRegression(max_iter=max_iter, warm_start=True)
    for c in sorted(cs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.set_params(C=c).fit(x_train, train[1])
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            unconverged.append(c)
        score = classification_metrics(val[1], _full_proba(model, x_val, n_classes))[criterion]
        if best is None or score > best[0]:
            best = (score, c, copy.deepcopy(model))
    score, c, model = best  # type: ignore[misc]  # cs is not empty
    out = classification_metrics(test[1], _full_proba(model, x_test, n_classes))
    out |= {"C": c, f"val_{criterion}": score}
    notes = [f"lbfgs hit max_iter={max_iter} for C in {unconverged}"] if unconverged else []
    return out, notes


def _training_span(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Coordinates of every array in an orthonormal basis V of the training rows' span.

    From the (N, N) Gram matrix X X^T = U S^2 U^T rather than an SVD of X (N, D): train
    becomes X V = U S and any other array Y becomes Y X^T U / S, at the cost of two matrix
    products.
    """
    eigval, eigvec = np.linalg.eigh(x_train @ x_train.T)
    keep = eigval > eigval.max() * 1e-12  # numerically zero directions carry no data
    sv, u = np.sqrt(eigval[keep]), eigvec[:, keep]
    return [u * sv, *((y @ x_train.T) @ u / sv for y in others)]


def _full_proba(model: LogisticRegression, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities (N, n_classes), zero for classes absent from the training split."""
    proba = np.zeros((len(x), n_classes))
    proba[:, model.classes_] = model.predict_proba(x)
    return proba


def probe(features: dict[str, torch.Tensor], labels: dict[str, np.ndarray], n_classes: int,
          k: int = 20, cs: Sequence[float] = DEFAULT_CS) -> tuple[dict, dict, list[str]]:
    """k-NN and linear probe of per-split features; returns (knn, linear, notes)."""
    knn = knn_probe((features["train"], labels["train"]), (features["test"], labels["test"]),
                    n_classes, k=k)
    arrays = {name: (f.double().numpy(), labels[name]) for name, f in features.items()}
    linear, notes = linear_probe(arrays["train"], arrays["val"], arrays["test"], n_classes, cs)
    return knn, linear, notes


# A source's builder returns a backbone, or (feature kind, function of the images) for
# features that are not a network's: raw voxels, shape descriptors.
FeatureFn = tuple[str, Callable[[torch.Tensor], torch.Tensor]]
# (label fraction, subset seed or None for all rows, training-split indices)
Subset = tuple[float, int | None, np.ndarray]
RAW: FeatureFn = ("voxels", lambda images: images.flatten(1))
SHAPE: FeatureFn = ("descriptors", shape_descriptors)


def training_subsets(labels: np.ndarray, fraction: float, seeds: Sequence[int]
                     ) -> list[Subset]:
    """(fraction, seed, training indices) per seed: the stratified subsets ``label_subset``
    gives the classification script for ``label_fraction=fraction seed=S`` (same row order);
    one entry with every index when ``fraction`` is 1."""
    if fraction == 1:
        return [(1.0, None, np.arange(len(labels)))]
    rows = [{"i": i, "y": y} for i, y in enumerate(labels.tolist())]
    return [(fraction, s, np.array([r["i"] for r in label_subset(rows, fraction, "y", s)]))
            for s in seeds]


def evaluate(sources: Sequence[tuple[str, int | None, Callable[[], nn.Module | FeatureFn]]],
             splits: dict[str, Split], n_classes: int, vit_features: Sequence[str] = ("cls",),
             k: int = 20, cs: Sequence[float] = DEFAULT_CS, batch_size: int = 64,
             device: str = "cpu",
             subsets: Sequence[Subset] | None = None) -> list[ProbeResult]:
    """Probe every source (a backbone, or ``RAW``/``SHAPE``-style features) on every
    training subset (default: the whole training split); the k-NN bank and the linear fit
    use the subset, val and test stay whole."""
    labels = {name: s.labels for name, s in splits.items()}
    subsets = subsets or training_subsets(labels["train"], 1.0, [])
    results = []
    for name, seed, build in sources:
        source = build()
        if isinstance(source, nn.Module):
            kinds = list(vit_features) if hasattr(source, "forward_tokens") else ["pooled"]
        else:
            kinds = [source[0]]
        for kind in kinds:
            start = time.perf_counter()
            if not isinstance(source, nn.Module):
                feats = {n: source[1](s.images) for n, s in splits.items()}
            else:
                mode = "cls" if kind == "pooled" else kind
                feats = {n: embed(source, s.images, mode, batch_size, device)
                         for n, s in splits.items()}
            seconds = time.perf_counter() - start
            for fraction, subset_seed, keep in subsets:
                start = time.perf_counter()
                knn, linear, notes = probe(feats | {"train": feats["train"][keep]},
                                           labels | {"train": labels["train"][keep]},
                                           n_classes, k, cs)
                results.append(ProbeResult(
                    name, kind, seed, int(feats["train"].shape[1]), knn, linear,
                    seconds + time.perf_counter() - start, notes, fraction, subset_seed))
                log.info("%s", _row(results[-1]))
    return results


def parse_backbone_config(text: str) -> dict[str, Any]:
    """A backbone config from a YAML/JSON file or an inline YAML/JSON mapping."""
    path = Path(text)
    source = path.read_text() if path.suffix in (".yaml", ".yml", ".json") else text
    config = yaml.safe_load(source)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"--random-init needs a mapping with a backbone 'name', got {text!r}")
    return config


def _row(r: ProbeResult) -> str:
    seed = "" if r.seed is None else r.seed
    subset = "" if r.subset_seed is None else r.subset_seed
    return (f"| {r.source} | {r.features} | {seed} | {r.label_fraction:g} | {subset} | "
            f"{r.dim} | {r.knn['auc']:.3f} | "
            f"{r.knn['accuracy']:.3f} | {r.knn['balanced_accuracy']:.3f} | "
            f"{r.linear['auc']:.3f} | {r.linear['accuracy']:.3f} | "
            f"{r.linear['balanced_accuracy']:.3f} | {r.linear['C']:g} | {r.seconds:.1f} |")


def markdown_table(results: Sequence[ProbeResult]) -> str:
    """One Markdown row per result (test split), plus notes."""
    lines = ["| source | features | seed | label fraction | subset seed | dim | k-NN AUC | "
             "k-NN acc | k-NN bal. acc | linear AUC | linear acc | linear bal. acc | C | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in results]
    lines += [f"- {r.source} {r.features} seed {r.seed}: {n}" for r in results for n in r.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="classification CSV: PatientID,path,fold,<target>")
    parser.add_argument("--target", default="label", help="target column (default: label)")
    parser.add_argument("--resize-to", type=int, nargs="+", required=True,
                        help="preprocessing size X Y Z, as in training")
    parser.add_argument("--train-folds", nargs="+", default=["train"])
    parser.add_argument("--val-folds", nargs="+", default=["val"])
    parser.add_argument("--test-folds", nargs="+", default=["test"])
    parser.add_argument("--raw", action="store_true", help="probe the raw voxels")
    parser.add_argument("--shape", action="store_true", help="probe hand-crafted shape "
                        "descriptors of binary masks (voxels > 0.5 after preprocessing); "
                        "read the linear probe, the k-NN compares their raw units")
    parser.add_argument("--backbone", nargs="*", default=[],
                        help="backbone files (backbone.pt exports, our checkpoints)")
    parser.add_argument("--random-init", help="backbone config (YAML/JSON file or inline) to "
                        "probe at random initialisation; a ViT's img_size defaults to --resize-to")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="initialisation seeds for --random-init")
    parser.add_argument("--vit-features", nargs="+", default=["cls"], choices=VIT_FEATURES,
                        help="ViT features: CLS token, mean patch token, or both concatenated")
    parser.add_argument("--label-fraction", type=float, default=1.0,
                        help="fit on this stratified fraction of the training split")
    parser.add_argument("--subset-seeds", type=int, nargs="+", default=[0],
                        help="seeds of the --label-fraction subsets (the classification "
                        "script's `seed` picks the same rows)")
    parser.add_argument("--k", type=int, default=20, help="k-NN neighbours (DINO: 20)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not (args.raw or args.shape or args.backbone or args.random_init):
        parser.error("nothing to probe: give --raw, --shape, --backbone and/or --random-init")

    start = time.perf_counter()
    splits, categories = load_splits(args.csv, args.target, args.resize_to, {
        "train": args.train_folds, "val": args.val_folds, "test": args.test_folds})
    log.info("loaded %s in %.1f s", {n: len(s.labels) for n, s in splits.items()},
             time.perf_counter() - start)
    sources: list[tuple[str, int | None, Callable[[], nn.Module | FeatureFn]]] = []
    if args.raw:
        sources.append(("raw voxels", None, lambda: RAW))
    if args.shape:
        sources.append(("shape", None, lambda: SHAPE))
    for path in args.backbone:
        sources.append((str(path), None, lambda p=path: load_backbone(p)[0]))
    if args.random_init:
        config = parse_backbone_config(args.random_init)
        if config["name"] == "vit":
            config.setdefault("img_size", list(args.resize_to))

        def random_backbone(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            backbone = build_backbone(**config)
            backbone.check_input_size(args.resize_to, "resize_to")
            return backbone

        for seed in args.seeds:
            sources.append((f"random {config['name']}", seed,
                            lambda s=seed: random_backbone(s)))
    subsets = training_subsets(splits["train"].labels, args.label_fraction, args.subset_seeds)
    results = evaluate(sources, splits, len(categories), args.vit_features, args.k,
                       batch_size=args.batch_size, device=args.device, subsets=subsets)
    print(f"\n{args.csv}, target {args.target} ({len(categories)} classes), resize_to "
          f"{args.resize_to}, test split n={len(splits['test'].labels)}; "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print(markdown_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
