"""One weight loader for DINO exports, Lightning checkpoints, SuPreM files and resume.

Files are read with ``torch.load(weights_only=True)``; names are unwrapped from DDP and
``torch.compile`` and mapped through one prefix table; every key is checked by name and shape.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.models.backbones import build_backbone

__all__ = [
    "DEFAULT_PREFIXES", "LoadReport", "load_backbone", "load_weights", "read_state_dict",
    "save_backbone",
]

log = logging.getLogger(__name__)

FORMAT = "medssl-backbone"
FORMAT_VERSION = 1
# Where each source keeps the backbone; order breaks ties, so the teacher wins over the student.
DEFAULT_PREFIXES: tuple[str, ...] = (
    "", "teacher_backbone.", "student_backbone.", "backbone.", "model.backbone.", "encoder.",
    "net.", "model.", "module.backbone.",
)
_WRAPPERS = ("module.", "_orig_mod.")  # DDP and torch.compile
_MAX_LISTED = 10


def _fmt(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


@dataclass
class LoadReport:
    """What ``load_weights`` did, by key name (names are the model's, after prefix stripping).

    Attributes:
        loaded: keys copied into the model.
        missing: model keys the checkpoint lacks.
        unexpected: checkpoint keys under the chosen prefix that the model lacks.
        mismatched: (name, checkpoint shape, model shape) of keys left out for their shape.
        prefix: what was stripped from checkpoint names (wrappers included).
        source: where the weights came from.
        skipped: keys ignored on either side because they match a ``skip`` pattern.
        ignored: checkpoint keys outside the chosen prefix (e.g. heads, the student).
    """

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]
    prefix: str
    source: str
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        parts = [f"loaded {len(self.loaded)}/{total} keys from {self.source} "
                 f"(prefix {self.prefix!r})"]
        parts.append(f"missing: {_fmt(self.missing)}")
        parts.append(f"unexpected: {_fmt(self.unexpected)}")
        mism = [f"{n} {tuple(c)} vs model {tuple(m)}" for n, c, m in self.mismatched]
        parts.append(f"shape mismatches: {_fmt(mism)}")
        if self.skipped:
            parts.append(f"skipped by pattern: {_fmt(self.skipped)}")
        if self.ignored:
            parts.append(f"{len(self.ignored)} keys outside the prefix ignored")
        return "; ".join(parts)

    @property
    def complete(self) -> bool:
        """True when nothing was missing, unexpected or mismatched."""
        return not (self.missing or self.unexpected or self.mismatched)


def save_backbone(
    path: str | Path, backbone: nn.Module, extra: dict[str, Any] | None = None
) -> None:
    """Write a backbone with its ``config`` so ``load_backbone`` can rebuild it.

    Args:
        path: output file; parent folders are created.
        backbone: a model from ``build_backbone`` (a ``torch.compile`` wrapper is unwrapped).
        extra: more plain-typed entries to store (e.g. epoch); must not reuse the reserved keys.
    """
    backbone = getattr(backbone, "_orig_mod", backbone)
    config = getattr(backbone, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"{type(backbone).__name__} has no backbone `config` with a 'name'.")
    # Catch non-JSON values (tuples are fine, objects are not) before writing a file that
    # weights_only=True could not read back.
    json.dumps(config)
    payload: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "backbone_config": dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
    }
    clash = set(payload) & set(extra or {})
    if clash:
        raise ValueError(f"extra must not use the reserved keys {sorted(clash)}.")
    payload.update(extra or {})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def _load_file(path: str | Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True): it pickles non-tensor "
            "objects (e.g. the argparse args of original DINO checkpoints). Re-save only its "
            "state dict from a trusted environment."
        ) from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _extract(obj: Any, path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(obj, Mapping):
        if obj.get("format") == FORMAT:
            kind, sd = FORMAT, obj.get("state_dict")
        elif "state_dict" in obj and "pytorch-lightning_version" in obj:
            kind, sd = "lightning", obj["state_dict"]
        elif "net" in obj:
            kind, sd = "suprem", obj["net"]
        elif "state_dict" in obj or "model" in obj:
            kind, sd = "state_dict", obj.get("state_dict", obj.get("model"))
        else:
            kind, sd = "flat", obj
        if _is_state_dict(sd) and sd:
            return dict(sd), kind
    keys = list(obj)[:_MAX_LISTED] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(
        f"{path} holds no recognisable state dict (expected a name->tensor dict, optionally under "
        f"'state_dict', 'model' or 'net'); top level: {keys}."
    )


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint's raw state dict and name its kind.

    Returns:
        (state dict, kind), kind one of "medssl-backbone", "lightning", "suprem", "state_dict",
        "flat".

    Raises:
        ValueError: the file needs full unpickling or holds no name->tensor dict.
    """
    return _extract(_load_file(path), path)


def _unwrap_name(name: str) -> str:
    """Drop DDP/compile wrappers at the start and compile wrappers of submodules anywhere."""
    while name.startswith(_WRAPPERS):
        name = name.split(".", 1)[1]
    return name.replace("._orig_mod.", ".")


def _unwrap_model(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None
        )
        if inner is None:
            return model
        model = inner


def load_weights(
    model: nn.Module,
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
    prefixes: Sequence[str] | None = None,
    strict: bool = False,
    skip: Sequence[str] = (),
) -> LoadReport:
    """Load every checkpoint key that matches a model key by name and shape.

    Args:
        model: the model to fill (DDP and ``torch.compile`` wrappers are unwrapped).
        path_or_state_dict: a checkpoint file (any kind ``read_state_dict`` knows) or a state dict.
        prefixes: candidate prefixes; the one matching the most model keys wins, earlier on ties.
            Defaults to ``DEFAULT_PREFIXES``.
        strict: raise unless every key is loaded (nothing missing, unexpected or mismatched).
        skip: regexes (``re.search`` on names after prefix stripping) of keys to leave out on both
            sides, e.g. task-specific output layers.

    Returns:
        The report, also logged at info level.

    Raises:
        ValueError: no key matched, names collide after unwrapping, or ``strict`` was violated.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw, source = dict(path_or_state_dict), "in-memory state dict"
    else:
        raw, kind = read_state_dict(path_or_state_dict)
        source = f"{kind} file {str(path_or_state_dict)!r}"
    ckpt: dict[str, tuple[str, torch.Tensor]] = {}
    for name, tensor in raw.items():
        key = _unwrap_name(name)
        if key in ckpt:
            raise ValueError(f"checkpoint keys {ckpt[key][0]!r} and {name!r} both map to {key!r}.")
        ckpt[key] = (name, tensor)
    model = _unwrap_model(model)
    target = model.state_dict()
    skip_re = [re.compile(p) for p in skip]

    def is_skipped(key: str) -> bool:
        return any(p.search(key) for p in skip_re)

    def mapped(prefix: str) -> dict[str, tuple[str, torch.Tensor]]:
        return {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}

    def score(prefix: str) -> tuple[int, int]:
        sub = {k: v for k, v in mapped(prefix).items() if k in target and not is_skipped(k)}
        same = sum(v[1].shape == target[k].shape for k, v in sub.items())
        return same, len(sub)

    if prefixes is None:
        prefixes = DEFAULT_PREFIXES
    if not prefixes:
        raise ValueError("prefixes must name at least one candidate prefix ('' for none).")
    candidates = dict.fromkeys(_unwrap_name(p) for p in prefixes)
    prefix = max(candidates, key=score)  # max keeps the first of equal scores
    sub = mapped(prefix)
    loaded, missing, unexpected, mismatched, skipped = [], [], [], [], []
    for key, tensor in target.items():
        if is_skipped(key):
            skipped.append(key)
        elif key not in sub:
            missing.append(key)
        elif sub[key][1].shape != tensor.shape:
            mismatched.append((key, tuple(sub[key][1].shape), tuple(tensor.shape)))
        else:
            loaded.append(key)
    for key in sub:
        if key not in target:
            (skipped if is_skipped(key) else unexpected).append(key)
    first = sub[loaded[0]][0] if loaded else ""
    stripped = first[: -len(loaded[0])] if loaded and first.endswith(loaded[0]) else prefix
    report = LoadReport(
        loaded, missing, unexpected, mismatched, stripped, source, skipped,
        ignored=[name for key, (name, _) in ckpt.items() if not key.startswith(prefix)],
    )
    if not loaded:
        raise ValueError(
            f"no checkpoint key matched the model (by name and shape) from {source}, tried "
            f"prefixes {list(candidates)}. Checkpoint keys: {_fmt(list(raw))}; "
            f"model keys: {_fmt(list(target))}."
        )
    if strict and not report.complete:
        raise ValueError(f"strict loading failed: {report}")
    result = model.load_state_dict({k: sub[k][1] for k in loaded}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(target) - set(loaded):
        raise RuntimeError(f"load_state_dict disagreed with the key check: {result}")
    log.info("%s", report)
    return report


def load_backbone(path: str | Path, **overrides: Any) -> tuple[nn.Module, LoadReport]:
    """Rebuild a backbone from a file that records its config, and load its weights.

    Args:
        path: a ``save_backbone`` file, or a Lightning checkpoint of ours whose
            ``hyper_parameters`` (or top level) hold ``backbone_config``; its
            ``teacher_backbone.`` weights are loaded.
        **overrides: constructor arguments replacing the stored ones (e.g. ``use_checkpoint``).

    Returns:
        (backbone, report); every backbone key is loaded or a ValueError is raised.
    """
    obj = _load_file(path)
    state_dict, kind = _extract(obj, path)
    hparams = obj.get("hyper_parameters") if kind == "lightning" else None
    config, prefixes = None, [""]
    if kind == FORMAT:
        config = obj.get("backbone_config")
    elif kind == "lightning":
        config = obj.get("backbone_config")
        if isinstance(hparams, Mapping) and "backbone_config" in hparams:
            config = hparams["backbone_config"]
        prefixes = ["teacher_backbone."]
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(
            f"{path} ({kind}) does not say how to rebuild the architecture (no 'backbone_config' "
            "with a 'name'). Build the model yourself and pass it to load_weights(model, path)."
        )
    backbone = build_backbone(**{**config, **overrides})
    report = load_weights(backbone, state_dict, prefixes=prefixes, strict=True)
    report.source = f"{kind} file {str(path)!r}"
    return backbone, report
