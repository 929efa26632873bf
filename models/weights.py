"""One weight loader for DINO exports, Lightning checkpoints, SuPreM files and resume.

Files are read with ``torch.load(weights_only=True)``; names are unwrapped from DDP and
``torch.compile`` and mapped through one prefix table; every key is checked by name and shape.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.errors import InputError
from medssl.models.backbones import build_backbone

__all__ = [
    "DECODER_PREFIXES", "DEFAULT_PREFIXES", "ENCODER_PREFIXES", "LoadReport", "load_backbone",
    "load_encoder_weights", "load_segmenter_weights", "load_weights", "read_state_dict",
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
        raise InputError(f"{type(backbone).__name__} has no backbone `config` with a 'name'.")
    # Catch non-JSON values (tuples are fine, objects are not) before writing a file that
    # weights_only=True could not read back.
    json.dumps(config)
    payload: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "backbone_config": dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
    }
    clash = set(payload) & set(extra or {})
    if clash:
        raise InputError(f"extra must not use the reserved keys {sorted(clash)}.")
    payload.update(extra or {})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


# What to do about a file that needs full unpickling: weights from outside are never unpickled;
# a checkpoint of one's own run may be, when the user vouches for it.
RESAVE_HINT = ("e.g. the argparse args of original DINO checkpoints. Re-save only its state "
               "dict from a trusted environment")
TRUST_HINT = ("loading it could run code from the file. Only if you trust its origin, set "
              "trust_checkpoint=true")


def load_file(path: str | Path, trust: bool = False, mmap: bool = False,
              unsafe_hint: str = RESAVE_HINT) -> Any:
    """``torch.load`` on CPU (``weights_only`` unless ``trust``), with errors that name the
    file and say what is wrong with it instead of torch's internals.

    Args:
        path: the file.
        trust: allow pickled Python objects (only for checkpoints the user vouches for).
        mmap: map the file instead of reading it (zip-format files only; others are read).
        unsafe_hint: what to do about a file that needs full unpickling.
    Raises:
        ValueError: the file is not a PyTorch file (empty, truncated, another format), or it
            needs full unpickling and ``trust`` is off.
    """
    path = Path(path)
    is_zip = zipfile.is_zipfile(path)  # torch.save's format since PyTorch 1.6
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        if is_zip and not trust and "Weights only load failed" in str(err):
            raise InputError(f"{path} cannot be read with torch.load(weights_only=True): it "
                             f"pickles objects beyond tensors and plain types ({unsafe_hint})."
                             ) from err
        raise InputError(_unreadable(path, err)) from err
    except (EOFError, KeyError, RuntimeError, OSError, ValueError) as err:
        raise InputError(_unreadable(path, err)) from err


def _unreadable(path: Path, err: BaseException) -> str:
    size = path.stat().st_size if path.is_file() else None
    what = ("not a file" if size is None else "it is empty" if size == 0
            else f"{size} bytes, neither a PyTorch file nor complete")
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return (f"{path} is not a readable PyTorch checkpoint ({what}; torch.load: "
            f"{type(err).__name__}{': ' + first if first else ''}). Was it copied completely?")


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
    others = [f"{k} ({type(v).__name__})" for k, v in obj.items()
              if not isinstance(v, torch.Tensor | Mapping)] if isinstance(obj, Mapping) else []
    raise InputError(
        f"{path} holds no recognisable state dict (expected a name->tensor dict, optionally under "
        f"'state_dict', 'model' or 'net'); top level: {keys}"
        + (f"; not tensors: {others[:_MAX_LISTED]}" if others else "") + "."
    )


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint's raw state dict and name its kind.

    Returns:
        (state dict, kind), kind one of "medssl-backbone", "lightning", "suprem", "state_dict",
        "flat".

    Raises:
        ValueError: the file needs full unpickling or holds no name->tensor dict.
    """
    return _extract(load_file(path), path)


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


_Checkpoint = dict[str, tuple[str, torch.Tensor]]  # unwrapped name -> (file's name, tensor)


# Backbone settings that change what the same weights compute (not their shapes), with the
# value a file that does not record them was trained with.
BEHAVIOUR_KEYS = {"input_norm": "none"}


def stored_config(obj: Any) -> Mapping | None:
    """The ``backbone_config`` recorded in a loaded export or Lightning checkpoint of ours."""
    if not isinstance(obj, Mapping):
        return None
    config = obj.get("backbone_config")
    hparams = obj.get("hyper_parameters")
    if isinstance(hparams, Mapping) and isinstance(hparams.get("backbone_config"), Mapping):
        config = hparams["backbone_config"]
    return config if isinstance(config, Mapping) else None


def check_behaviour(stored: Mapping | None, own: Mapping | None, source: str) -> None:
    """Raise a ValueError when a backbone built from ``own`` (its config) would compute
    something else with the file's weights than the file's network (config ``stored``) did
    (``BEHAVIOUR_KEYS``)."""
    if not isinstance(stored, Mapping) or not isinstance(own, Mapping) \
            or stored.get("name") != own.get("name"):
        return
    for key, default in BEHAVIOUR_KEYS.items():
        theirs, ours = stored.get(key, default), own.get(key, default)
        if theirs != ours:
            raise InputError(f"{source} was trained with backbone.{key}={theirs}, but this "
                             f"network has backbone.{key}={ours}: set backbone.{key}={theirs} "
                             "(the same weights compute something else otherwise)")


def _read_source(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
    model: nn.Module | None = None,
) -> tuple[_Checkpoint, str]:
    """Checkpoint tensors by unwrapped name, and a description of where they came from;
    with ``model``, first ``check_behaviour`` against the file's recorded backbone config."""
    if isinstance(path_or_state_dict, Mapping):
        raw, source = dict(path_or_state_dict), "in-memory state dict"
    else:
        obj = load_file(path_or_state_dict)
        raw, kind = _extract(obj, path_or_state_dict)
        source = f"{kind} file {str(path_or_state_dict)!r}"
        if model is not None:
            check_behaviour(stored_config(obj), getattr(model, "config", None), source)
    ckpt: _Checkpoint = {}
    for name, tensor in raw.items():
        key = _unwrap_name(name)
        if key in ckpt:
            raise InputError(f"checkpoint keys {ckpt[key][0]!r} and {name!r} both map to {key!r}.")
        ckpt[key] = (name, tensor)
    return ckpt, source


def _skipper(skip: Sequence[str]) -> Callable[[str], bool]:
    patterns = [re.compile(p) for p in skip]
    return lambda key: any(p.search(key) for p in patterns)


def _candidates(prefixes: Sequence[str] | None) -> list[str]:
    if prefixes is None:
        prefixes = DEFAULT_PREFIXES
    if not prefixes:
        raise InputError("prefixes must name at least one candidate prefix ('' for none).")
    return list(dict.fromkeys(_unwrap_name(p) for p in prefixes))


def _under(ckpt: _Checkpoint, prefix: str) -> _Checkpoint:
    return {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}


def _choose_prefix(ckpt: _Checkpoint, target: Mapping[str, torch.Tensor],
                   candidates: Sequence[str], is_skipped: Callable[[str], bool]) -> str:
    """The candidate under which most checkpoint keys match ``target`` by name and shape."""

    def score(prefix: str) -> tuple[int, int]:
        sub = {k: v for k, v in _under(ckpt, prefix).items()
               if k in target and not is_skipped(k)}
        return sum(v[1].shape == target[k].shape for k, v in sub.items()), len(sub)

    return max(candidates, key=score)  # max keeps the first of equal scores


def _stripped_prefix(sub: _Checkpoint, key: str | None, fallback: str) -> str:
    """What was cut from the file's name of ``key`` (wrappers included)."""
    if key is None:
        return fallback
    name = sub[key][0]
    return name[: -len(key)] if name.endswith(key) else fallback


def _plan(ckpt: _Checkpoint, target: Mapping[str, torch.Tensor], prefix: str, source: str,
          is_skipped: Callable[[str], bool]) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """Sort every key into loaded/missing/unexpected/mismatched/skipped; nothing is loaded."""
    sub = _under(ckpt, prefix)
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
    report = LoadReport(
        loaded, missing, unexpected, mismatched,
        _stripped_prefix(sub, loaded[0] if loaded else None, prefix), source, skipped,
        ignored=[name for key, (name, _) in ckpt.items() if not key.startswith(prefix)],
    )
    return report, {k: sub[k][1] for k in loaded}


def _require_match(report: LoadReport, ckpt: _Checkpoint, target: Mapping[str, torch.Tensor],
                   tried: Sequence[str]) -> None:
    if not report.loaded and report.mismatched:  # the names fit, the sizes do not
        shown = [f"{n} {tuple(c)} in the file, {tuple(m)} in the model"
                 for n, c, m in report.mismatched[:3]]
        raise InputError(
            f"no checkpoint key matched the model by shape from {report.source}: "
            f"{len(report.mismatched)} keys match by name but differ in shape (e.g. "
            f"{'; '.join(shown)}). The file's network was built with other settings (sizes, "
            "patch size, dimensions): configure the backbone it was trained with."
        )
    if not report.loaded:
        raise InputError(
            f"no checkpoint key matched the model (by name and shape) from {report.source}, "
            f"tried prefixes {list(tried)}. Checkpoint keys: "
            f"{_fmt([name for name, _ in ckpt.values()])}; model keys: {_fmt(list(target))}."
        )


def _apply(model: nn.Module, target: Mapping[str, torch.Tensor], report: LoadReport,
           tensors: Mapping[str, torch.Tensor]) -> None:
    result = model.load_state_dict(dict(tensors), strict=False)
    # Without state-dict metadata, torch fills an absent BatchNorm num_batches_tracked itself
    # (pre-version-2 checkpoints) instead of listing it missing.
    expected = {k for k in set(target) - set(tensors) if not k.endswith("num_batches_tracked")}
    got = {k for k in result.missing_keys if not k.endswith("num_batches_tracked")}
    if result.unexpected_keys or got != expected:
        raise RuntimeError(f"load_state_dict disagreed with the key check: {result}")
    log.info("%s", report)


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
        ValueError: no key matched, names collide after unwrapping, or ``strict`` was violated;
            then nothing is loaded.
    """
    model = _unwrap_model(model)
    ckpt, source = _read_source(path_or_state_dict, model)
    target = model.state_dict()
    is_skipped = _skipper(skip)
    candidates = _candidates(prefixes)
    prefix = _choose_prefix(ckpt, target, candidates, is_skipped)
    report, tensors = _plan(ckpt, target, prefix, source, is_skipped)
    _require_match(report, ckpt, target, candidates)
    if strict and not report.complete:
        raise InputError(f"strict loading failed: {report}")
    _apply(model, target, report, tensors)
    return report


def _with_part(part: str) -> tuple[str, ...]:
    """``DEFAULT_PREFIXES``, then each followed by ``part`` (e.g. a segmentation checkpoint)."""
    return tuple(dict.fromkeys([*DEFAULT_PREFIXES, *(p + part for p in DEFAULT_PREFIXES)]))


ENCODER_PREFIXES = _with_part("encoder.")
DECODER_PREFIXES = _with_part("decoder.")


def load_encoder_weights(
    segmenter: nn.Module,
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
    strict: bool = True,
) -> LoadReport:
    """Load pre-trained backbone weights into ``segmenter.encoder``.

    For DINO/MAE exports (``save_backbone`` files), our Lightning checkpoints (teacher first),
    SuPreM files and segmentation checkpoints (``encoder.`` under any ``DEFAULT_PREFIXES``
    entry): candidates are ``ENCODER_PREFIXES``. Checkpoint keys beyond the encoder (a decoder,
    heads) are listed as unexpected or ignored, never an error.

    Args:
        segmenter: a model with an ``encoder`` (e.g. from ``build_segmenter``; wrappers unwrapped).
        path_or_state_dict: a checkpoint file or a state dict.
        strict: raise unless every encoder key is loaded (none missing or mismatched).

    Returns:
        The report; names are the encoder's own (without ``encoder.``).

    Raises:
        ValueError: no key matched, or ``strict`` was violated; then nothing is loaded.
    """
    encoder = _unwrap_model(segmenter).encoder
    ckpt, source = _read_source(path_or_state_dict, encoder)
    target = encoder.state_dict()
    candidates = _candidates(ENCODER_PREFIXES)
    never = _skipper(())
    report, tensors = _plan(ckpt, target, _choose_prefix(ckpt, target, candidates, never),
                            source, never)
    _require_match(report, ckpt, target, candidates)
    if strict and (report.missing or report.mismatched):
        raise InputError(f"not every encoder key could be loaded: {report}")
    _apply(encoder, target, report, tensors)
    return report


def load_segmenter_weights(
    segmenter: nn.Module,
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
    strict: bool = False,
    skip: Sequence[str] = (),
) -> LoadReport:
    """Load a full network (encoder and decoder) into a segmenter, each part by its own prefix.

    The encoder part takes ``ENCODER_PREFIXES``, the decoder part ``DECODER_PREFIXES``, so one
    call loads a full SuPreM UNet3D or SwinUNETR file (both parts under ``module.backbone.``), a
    MONAI FlexibleUNet state dict (``encoder.`` and no prefix) or our segmentation checkpoints.
    When the checkpoint's output layer (``segmenter.head_prefix``) has another shape (another
    class count), it is left out and listed as skipped.

    Args:
        segmenter: a model with ``encoder``, ``decoder`` and ``head_prefix`` (``build_segmenter``).
        path_or_state_dict: a checkpoint file or a state dict.
        strict: raise unless every segmenter key is loaded or skipped and nothing is unexpected.
        skip: regexes (``re.search``) of segmenter key names to leave out.

    Returns:
        The report, with the segmenter's key names; ``prefix`` names both parts' prefixes.

    Raises:
        ValueError: no key matched or ``strict`` was violated; then nothing is loaded.
    """
    model = _unwrap_model(segmenter)
    # The encoder's config against the file's: same weights, other computation is an error.
    ckpt, source = _read_source(path_or_state_dict, getattr(model, "encoder", None))
    target = model.state_dict()
    is_skipped = _skipper(skip)
    parts = []
    for part, prefixes in (("encoder.", ENCODER_PREFIXES), ("decoder.", DECODER_PREFIXES)):
        part_target = {k[len(part):]: v for k, v in target.items() if k.startswith(part)}
        prefix = _choose_prefix(ckpt, part_target, _candidates(prefixes),
                                lambda k, part=part: is_skipped(part + k))
        parts.append((part, prefix, part_target))
    # The checkpoint renamed to segmenter keys; the rest is unexpected (under a chosen prefix)
    # or ignored (outside both).
    merged: _Checkpoint = {}
    unexpected, ignored, skipped, first = [], [], [], {}
    for key, (name, tensor) in ckpt.items():
        owners = [(part, key[len(prefix):]) for part, prefix, part_target in parts
                  if key.startswith(prefix) and key[len(prefix):] in part_target]
        if owners:
            part, rest = owners[0]  # one prefix per part: distinct keys, distinct names
            merged[part + rest] = (name, tensor)
            first.setdefault(part, (name, rest))
        elif any(key.startswith(prefix) for _, prefix, _ in parts):
            rest = next(key[len(p):] for _, p, _ in parts if key.startswith(p))
            (skipped if is_skipped(rest) else unexpected).append(rest)
        else:
            ignored.append(name)
    head = getattr(model, "head_prefix", None)
    head_differs = head is not None and any(
        k.startswith(head) and merged[k][1].shape != target[k].shape for k in merged)
    if head_differs:
        log.info("output layer %s* left out: its shapes differ (another class count)", head)
    report, tensors = _plan(
        merged, target, "", source,
        lambda k: is_skipped(k) or bool(head_differs and k.startswith(head)))
    report.unexpected, report.ignored = unexpected, ignored
    report.skipped += skipped

    def cut(part: str, prefix: str) -> str:  # what was cut from the file's names of this part
        name, rest = first.get(part, ("", ""))
        return name[: -len(rest)] if rest and name.endswith(rest) else prefix

    report.prefix = ", ".join(f"{part[:-1]} {cut(part, prefix)!r}" for part, prefix, _ in parts)
    _require_match(report, ckpt, target, [p for _, p, _ in parts])
    if strict and not report.complete:
        raise InputError(f"strict loading failed: {report}")
    _apply(model, target, report, tensors)
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
    obj = load_file(path)
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
        raise InputError(
            f"{path} ({kind}) does not say how to rebuild the architecture (no 'backbone_config' "
            "with a 'name'). Build the model yourself and pass it to load_weights(model, path)."
        )
    backbone = build_backbone(**{**config, **overrides})
    report = load_weights(backbone, state_dict, prefixes=prefixes, strict=True)
    report.source = f"{kind} file {str(path)!r}"
    return backbone, report


def _plain_json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as stored in files


def check_backbone_config(what: str, stored: Mapping, configured: Mapping) -> None:
    """Raise a ValueError naming the backbone keys in which ``stored`` (a file's config)
    differs from ``configured``, when the difference changes the network's parameters.

    Keys that change no parameter (dropout, gradient checkpointing) may differ: the two
    networks are built and their parameter names and shapes compared (only when some key
    differs).
    """
    stored, configured = _plain_json(dict(stored)), _plain_json(dict(configured))
    check_behaviour(stored, configured, what)
    differ = sorted(k for k in stored if stored[k] != configured.get(k))
    if not differ:
        return
    try:
        shapes = [{k: v.shape for k, v in build_backbone(**c).state_dict().items()}
                  for c in (stored, configured)]
        same = shapes[0] == shapes[1]
    except (TypeError, ValueError):
        same = False
    listed = "; ".join(f"backbone.{k}: {stored.get(k)!r} in the file, {configured.get(k)!r} "
                       "configured" for k in differ)
    if same:
        log.info("%s: backbone settings differ without changing parameters (%s)", what, listed)
        return
    if stored.get("name") != configured.get("name"):  # another backbone group altogether
        listed = (f"a {stored.get('name')} backbone in the file, {configured.get('name')} "
                  "configured")
        fix = f"backbone={stored.get('name')}" + "".join(
            f" backbone.{k}={json.dumps(stored[k]).replace(' ', '')}" for k in differ
            if k != "name" and k in stored)
    else:
        fix = " ".join(f"backbone.{k}={json.dumps(stored[k]).replace(' ', '')}"
                       for k in differ if k in stored)
    raise InputError(f"{what} holds a backbone built with other settings: {listed}. Configure "
                     f"the file's backbone, e.g. `{fix}` (a ViT interpolates its position "
                     "embeddings, so resize_to may still differ from img_size)")
