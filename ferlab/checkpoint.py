"""Checkpoints: safetensors weights carrying their full config, so a path is all evaluate/explain need.

A checkpoint's metadata (JSON under the safetensors key ``ferlab``) holds the model
name and arguments, the preprocessing and its statistics, the class names, the data
fingerprint, the split protocol and the training config. The resumable training
state (optimiser, schedule, callbacks) lives in ``RUN_DIR/last.pt``, written
atomically and read back with ``torch.load(weights_only=True)``: nothing is unpickled.

Weights may be stored as int8 (:func:`quantize_int8`): each conv and linear weight as int8 with one float32 scale
per output channel beside it, under ``NAME`` + :data:`INT8_SCALE`; :func:`load_checkpoint` restores float weights.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ferlab.models import FerModel, create_model
from ferlab.transforms import Normalizer

FORMAT = "ferlab-checkpoint"
FORMAT_VERSION = 1
META_KEYS = ("model", "preprocess", "class_names")  # what rebuilding and feeding the model need
BEST = "best.safetensors"
INT8_SCALE = ".int8_scale"  # suffix of the per-output-channel scale stored beside an int8 weight
LAST_STATE = "last.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not a ferlab checkpoint."""


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``, so a crash never leaves a half-written file.

    The file gets the permissions a plain ``open(path, "w")`` would give it (0o666 less the umask), not the
    owner-only 0o600 of :func:`tempfile.mkstemp`, so that shared run folders and shipped files stay readable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
    try:
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors does) must not change its permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous, detached CPU tensors (safetensors needs that)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` to a safetensors file, atomically."""
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **meta}
    tensors = state_for_saving(model)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"ferlab": json.dumps(meta)}))


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store every floating tensor of two or more dimensions (conv and linear weights) as int8, symmetric, one
    float32 scale per output channel (``max |w| / 127``, rounded to nearest); other tensors unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, v in state.items():
        if not (v.is_floating_point() and v.dim() >= 2):
            out[name] = v
            continue
        w = v.detach().float()  # (out, ...)
        amax = w.abs().flatten(1).amax(1)  # (out,)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # an all-zero channel stays zero
        shape = (-1,) + (1,) * (w.dim() - 1)
        out[name] = torch.round(w / scale.view(shape)).clamp_(-127, 127).to(torch.int8).contiguous()
        out[name + INT8_SCALE] = scale.contiguous()
    return out


def dequantize_int8(state: dict[str, torch.Tensor], where: str | Path) -> dict[str, torch.Tensor]:
    """Float weights back from :func:`quantize_int8`'s int8 tensors and scales; a state without int8 tensors is
    returned as it is. A missing, orphaned, mis-shaped or non-finite scale is a :class:`CheckpointError`."""
    scales = {n[: -len(INT8_SCALE)]: v for n, v in state.items() if n.endswith(INT8_SCALE)}
    out: dict[str, torch.Tensor] = {}
    for name, v in state.items():
        if name.endswith(INT8_SCALE):
            base = name[: -len(INT8_SCALE)]
            if base not in state or state[base].dtype != torch.int8:
                raise CheckpointError(f"{where}: scale {name!r} has no int8 tensor {base!r}")
            continue
        if v.dtype != torch.int8:
            out[name] = v
            continue
        scale = scales.get(name)
        if scale is None:
            raise CheckpointError(f"{where}: int8 tensor {name!r} has no scale {name + INT8_SCALE!r}")
        if v.dim() < 2 or not scale.is_floating_point() or tuple(scale.shape) != (v.shape[0],):
            raise CheckpointError(f"{where}: int8 tensor {name!r} of shape {tuple(v.shape)} needs a floating scale "
                                  f"of shape ({v.shape[0]},), got {scale.dtype} {tuple(scale.shape)}")
        if not torch.isfinite(scale).all():
            raise CheckpointError(f"{where}: scale {name + INT8_SCALE!r} is not finite")
        out[name] = v.float() * scale.float().view((-1,) + (1,) * (v.dim() - 1))
    return out


def resolve(path: str | Path) -> Path:
    """A run directory resolves to its best checkpoint, a shipped model name to its packaged file;
    a file is taken as it is."""
    from ferlab import pretrained

    p = Path(path)
    if not p.exists() and pretrained.is_pretrained(str(path)):
        return pretrained.pretrained_path(str(path))
    if p.is_dir():
        p = p / BEST
        if not p.is_file():
            raise CheckpointError(f"{path}: run directory has no {BEST} (has training finished an epoch?)")
    elif not p.is_file():
        shipped = ", ".join(e["name"] for e in pretrained.list_pretrained())
        raise CheckpointError(f"{path}: no such checkpoint file, run directory or shipped model"
                              + (f" (shipped: {shipped})" if shipped else ""))
    return p


PICKLE_REFUSED = ("pickles are refused: loading one can run any code it holds; re-save trusted weights as "
                  "safetensors, e.g. a ferlab run's best.safetensors")


def pickle_kind(path: str | Path) -> str | None:
    """'a PyTorch .pt/.pth file' (a zip of pickles) or 'a pickle' from a file's first bytes, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch .pt/.pth file (pickled)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode and a protocol number
        return "a pickle"
    return None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint (file or run directory) without loading its weights."""
    from safetensors import safe_open

    p = resolve(path)
    try:
        with open(p, "rb"):
            pass
    except OSError as e:  # e.g. no permission: said as such, not as a missing or malformed file
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None
    kind = pickle_kind(p)
    if kind is not None:
        raise CheckpointError(f"{p}: {kind}, not a safetensors checkpoint; {PICKLE_REFUSED}")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("ferlab")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    if raw is None:
        raise CheckpointError(f"{p}: safetensors file has no ferlab metadata; not a ferlab checkpoint")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{p}: damaged ferlab metadata ({e})") from None
    if isinstance(meta, dict) and meta.get("format") == FORMAT and not _is_int(meta.get("version", 0)):
        raise CheckpointError(f"{p}: malformed ferlab metadata (version must be an integer, "
                              f"got {meta['version']!r})")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        got = f"{meta.get('format')} v{meta.get('version')}" if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{p}: unsupported checkpoint format {got}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{p}: incomplete ferlab metadata (no {', '.join(missing)})")
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"{p}: malformed ferlab metadata ({problem})")
    return meta


def _is_int(x: Any) -> bool:
    """True for a JSON integer (a bool is not one)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the shape of ``model``, ``preprocess`` and ``class_names``; None when they are sound."""
    m = meta["model"]
    if not isinstance(m, dict):
        return f"model must be an object, got {type(m).__name__}"
    if not isinstance(m.get("name"), str):
        return "model.name must be a string"
    for key in ("num_classes", "in_chans"):
        if not _is_int(m.get(key)) or m[key] < 1:
            return f"model.{key} must be a positive integer, got {m.get(key)!r}"
    if not isinstance(m.get("args", {}), dict):
        return f"model.args must be an object, got {type(m['args']).__name__}"
    pre = meta["preprocess"]
    if not isinstance(pre, dict) or not isinstance(pre.get("normalize"), dict):
        return "preprocess must be an object holding a normalize object"
    names = meta["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "class_names must be a list of strings"
    if len(names) != m["num_classes"]:
        return f"{len(names)} class_names for a model of {m['num_classes']} classes"
    return None


def build_model(meta: dict[str, Any]) -> FerModel:
    """A fresh (untrained) model as described by checkpoint metadata ``meta``."""
    m = meta["model"]
    return create_model(m["name"], num_classes=m["num_classes"], in_chans=m["in_chans"], **m.get("args", {}))


def load_checkpoint(path: str | Path) -> tuple[FerModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint (file or run directory), in eval mode, with its metadata."""
    p = resolve(path)
    meta = read_meta(p)
    try:
        model = build_model(meta)
    except (KeyError, TypeError, ValueError) as e:  # unknown model name, unexpected or ill-typed model args
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"{p}: malformed ferlab metadata ({type(e).__name__}: {msg})") from None
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p}: cannot read weights ({e})") from None
    state = dequantize_int8(state, p)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        first = str(e).strip().splitlines()[:3]
        raise CheckpointError(f"{p}: weights do not fit model {meta['model']['name']}: {' '.join(first)}") from None
    return model.eval(), meta


def normalizer_from_meta(meta: dict[str, Any]) -> Normalizer:
    return Normalizer(**meta["preprocess"]["normalize"])


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Save the resumable training state atomically (only tensors, numbers, strings, lists and dicts)."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a training state saved by :func:`save_state`; never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or hostile files
        text = str(e)
        if "Weights only load failed" in text:  # a pickle of other objects than tensors, numbers and strings
            # torch's message advises weights_only=False, the very thing not to do with an untrusted file: keep
            # only its account of what the file holds
            what = next((line.split("error:", 1)[-1].strip() for line in text.splitlines()
                         if "WeightsUnpickler error" in line or "unsupported GLOBAL" in line), "")
            what = what.split(". Please")[0].split(" Please")[0].rstrip(".")
            detail = f" ({what})" if what else ""
            raise CheckpointError(f"{path}: holds objects other than tensors, numbers and strings{detail}; not "
                                  "loaded: such pickles are refused, loading one can run any code it holds") from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise CheckpointError(f"{path}: cannot load training state safely ({type(e).__name__}: {first})") from None
