"""Ship a trained run: packaged weights, a manifest entry with measured accuracies, and a model card.

    python bench/ship_model.py runs/fer-resnet-s --name fer-resnet-s-fer2013 --data fer2013.csv.gz \\
        --config configs/fer-resnet-s.toml --hardware "2-core x86 CPU (Intel Xeon ...)" [--dtype bf16] [--default]

1. copies the run's best checkpoint (selected on PublicTest) to WEIGHTS_DIR/NAME.safetensors, fp32 or cast to
   bf16/fp16 (half the size), or int8 (a quarter: conv and linear weights as int8 with a scale per output
   channel, the rest fp16); the metadata keeps only the data file's name, not the local path;
2. evaluates *that shipped file* on PublicTest (val) and PrivateTest (test), with and without flip TTA,
   exactly as ``ferlab evaluate --pretrained NAME --data PATH --split SPLIT [--tta]`` does;
3. writes the manifest entry (stated accuracies, size, sha256, card) into WEIGHTS_DIR/manifest.json;
4. writes the model card docs/models/NAME.md and docs/models/NAME-confusion.png.

WEIGHTS_DIR is the package's ``ferlab/weights`` unless ``--weights-dir`` or ``FERLAB_WEIGHTS_DIR`` says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from ferlab.hardware import cpu_name

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8+float16"}
SIZE_LIMIT_MB = 20.0  # all shipped weights together
SPLIT_LABELS = {"val": "PublicTest (val)", "test": "PrivateTest (test)"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _name_only(value: Any) -> Any:
    return Path(value).name if isinstance(value, str) and value else value


def without_local_paths(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with every file it names (the data, the FER+ votes, a warm start, soft targets, teacher runs) by
    its name only: users pass --data, and a shipped file does not carry the shipping machine's folders."""
    meta = json.loads(json.dumps(meta))
    data = meta.get("data") or {}
    for key in ("path", "source"):
        data[key] = _name_only(data.get(key))
    if isinstance(meta.get("labels"), dict) and "file" in meta["labels"]:
        meta["labels"]["file"] = _name_only(meta["labels"]["file"])
    if isinstance(meta.get("distill_targets"), dict) and "file" in meta["distill_targets"]:
        meta["distill_targets"]["file"] = _name_only(meta["distill_targets"]["file"])
    train = meta.get("train") or {}
    for key in ("data", "init_from", "distill_targets"):
        if key in train:
            train[key] = _name_only(train[key])
    if train.get("labels") not in (None, "", "fer2013", "ferplus"):  # a votes file given by its path
        train["labels"] = _name_only(train["labels"])
    if isinstance(train.get("teachers"), list):
        train["teachers"] = [_name_only(t) for t in train["teachers"]]
    for teacher in meta.get("teachers") or []:  # what the distillation recorded of each teacher
        if isinstance(teacher, dict) and "spec" in teacher:
            teacher["spec"] = _name_only(teacher["spec"])
    return meta


def write_shipped(run: str, name: str, weights_dir: Path, dtype: str) -> tuple[Path, dict[str, Any], str | None]:
    """Copy the run's best weights to WEIGHTS_DIR/NAME.safetensors (floating tensors cast to ``dtype``).

    Returns the file, its metadata and the run's own data path (None for the synthetic faces)."""
    import torch
    from safetensors.torch import load_file, save_file

    from ferlab.checkpoint import INT8_SCALE, atomic_write, quantize_int8, read_meta, resolve

    src = resolve(run)
    meta = read_meta(src)
    state = load_file(str(src))
    if dtype == "int8":
        state = quantize_int8(state)
    target = torch.float16 if dtype == "int8" else getattr(torch, DTYPES[dtype])
    state = {k: v if k.endswith(INT8_SCALE) or not v.is_floating_point() else v.to(target)
             for k, v in state.items()}
    run_data = meta["data"].get("path")
    meta = without_local_paths(meta)
    from_run = meta.get("shipped", {}).get("from_run") or Path(run).name  # a shipped file keeps its own run's name
    meta["shipped"] = {"name": name, "dtype": DTYPES[dtype], "from_run": from_run}
    path = weights_dir / f"{name}.safetensors"
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"ferlab": json.dumps(meta)}))
    return path, meta, run_data


def evaluate_shipped(path: Path, data: str | None) -> dict[tuple[str, bool], dict[str, Any]]:
    """The shipped file's reports on val and test, without and with flip TTA."""
    from ferlab.evaluate import evaluate_checkpoints

    return {(split, tta): evaluate_checkpoints([path], split=split, data_path=data, tta=tta, progress=False)
            for split in ("val", "test") for tta in (False, True)}


def manifest_entry(name: str, path: Path, meta: dict[str, Any], reports: dict, args: argparse.Namespace,
                   summary: dict[str, Any], card: Path) -> dict[str, Any]:
    from ferlab.models import get_entry

    return {
        "file": path.name,
        "model": meta["model"]["name"],
        "description": args.description or get_entry(meta["model"]["name"]).description,
        "params": meta["model"]["params"]["trainable"],
        "dtype": meta["shipped"]["dtype"],
        "size_bytes": path.stat().st_size,
        "sha256": sha256(path),
        "card": str(card),
        "data": {"source": Path(reports["test", False]["data"]).name,  # the file's name, not a local path
                 "fingerprint": reports["test", False]["data_fingerprint"]},
        "protocol": reports["test", False]["protocol"],
        "accuracy": {split: {"plain": reports[split, False]["accuracy"], "tta": reports[split, True]["accuracy"]}
                     for split in ("val", "test")},
        "n": {split: reports[split, False]["n"] for split in ("val", "test")},
        "hardware": args.hardware,
        "train_minutes": round(summary.get("train_seconds_total", float("nan")) / 60, 1),
        "config": args.config,
        "kind": "single",
        "roles": (["default"] if args.default else []) + list(getattr(args, "role", [])),
        "labels": "ferplus" if meta.get("labels") else "fer2013",  # what the accuracies are measured against
        "classes": len(meta["class_names"]),
    }


def store_file(name: str, new: Path, shipped: Path) -> None:
    """Replace shipped model ``name``'s file ``shipped`` by ``new`` (the same net stored otherwise) and update its
    manifest entry's ``dtype``, ``size_bytes`` and ``sha256``; the rest of the entry stays as it was."""
    import shutil

    from ferlab.checkpoint import atomic_write, read_meta

    dtype = read_meta(new)["shipped"]["dtype"]
    atomic_write(shipped, lambda tmp: shutil.copyfile(new, tmp))
    shipped.chmod(0o644)
    manifest = json.loads((shipped.parent / "manifest.json").read_text())
    manifest[name].update(dtype=dtype, size_bytes=shipped.stat().st_size, sha256=sha256(shipped))
    update_manifest(shipped.parent, name, manifest[name])
    print(f"stored {name} as {dtype}: {shipped} ({shipped.stat().st_size / 1e6:.2f} MB); measure it again with "
          f"bench/shelf.py, bench/calibration.py --write and bench/robustness.py --write", file=sys.stderr)


def update_manifest(weights_dir: Path, name: str, entry: dict[str, Any]) -> Path:
    from ferlab.checkpoint import atomic_write
    from ferlab.pretrained import MANIFEST_NAME

    path = weights_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if "default" in entry.get("roles", []):  # one default: the role moves to this entry
        for other in manifest.values():
            other.pop("default", None)
            if "default" in other.get("roles", []):
                other["roles"].remove("default")
    manifest[name] = entry
    text = json.dumps(dict(sorted(manifest.items())), indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = "|" + "|".join("---:" if i else ":---" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", align]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def model_card(name: str, entry: dict[str, Any], meta: dict[str, Any], reports: dict, summary: dict[str, Any],
               png_name: str, data_arg: str | None) -> str:
    """The model card in Markdown."""
    from ferlab.checkpoint import build_model
    from ferlab.models.summary import flops_per_image

    acc = entry["accuracy"]
    test = reports["test", False]
    test_tta = reports["test", True]
    classes = meta["class_names"]
    train = meta["train"]
    data_name = Path(data_arg).name if data_arg else meta["data"].get("path")  # None: the synthetic faces
    data_flag = f" --data {data_name}" if data_name else ""
    mflops = flops_per_image(build_model(meta)) / 1e6
    recall_rows = [
        [c, f"{test['per_class'][c]['support']:,}", f"{test['per_class'][c]['precision']:.3f}",
         f"{test['per_class'][c]['recall']:.3f}", f"{test_tta['per_class'][c]['recall']:.3f}",
         f"{test['per_class'][c]['f1']:.3f}"]
        for c in classes
    ]
    cm = test["confusion"]
    cm_table = _table(["true \\ predicted"] + classes,
                      [[f"**{c}**"] + [f"{v:,}" for v in cm[i]] for i, c in enumerate(classes)])
    recall_table = _table(["class", "support", "precision", "recall", "recall with TTA", "F1"], recall_rows)
    if meta.get("labels"):
        label_limits = ("Trained and scored on FER+ labels: the majority of 10 crowd votes per FER2013 face (8 "
                        "classes, Contempt added; faces voted unknown or not-a-face left out). They are cleaner than "
                        "FER2013's own labels, but still one crowd's reading of a 48x48 face; Disgust and Contempt "
                        "have fewer than 200 training faces each, so their recall is the least reliable.")
    else:
        label_limits = ("FER2013 labels are noisy: faces were found by image search and labelled once; human "
                        "accuracy on it is about\n  65%, and part of the errors above are label errors. Disgust has "
                        "few training images (about 1.5%), so its\n  recall is the least reliable.")
    config_line = (f"[`{entry['config']}`](../../{entry['config']})" if entry.get("config")
                   else "not given; the full training config is below")
    sizes = meta["split"].get("sizes", {})
    keys = ("optimizer", "lr", "weight_decay", "schedule", "epochs", "batch_size", "label_smoothing", "augment",
            "normalize", "precision", "seed")
    optional = ("mixup", "cutmix", "ema_decay")  # named when on
    recipe = ", ".join(f"{k} {json.dumps(train[k])}" for k in keys if k in train)
    recipe += "".join(f", {k} {json.dumps(train[k])}" for k in optional if train.get(k))
    if train.get("teachers"):  # knowledge distillation: the teachers are part of the recipe
        fp = meta["data"]["fingerprint"]
        same = all(t.get("data_fingerprint") == fp for t in meta.get("teachers", []))
        recipe += (f"\n- distilled from {', '.join(f'`{t}`' for t in train['teachers'])} (weight "
                   f"{train['distill_weight']}, temperature {train['distill_temperature']}"
                   + (f", offline: soft targets predicted once on the un-augmented Training images, averaged over "
                      f"the {train['distill_offline']} test-time views" if train.get("distill_offline") else "")
                   + "); the teachers were "
                   + ("trained on the same data" if same else "**not all trained on the same data**"))
    best = meta.get("result", {})
    return f"""# {name}

`{entry['model']}` trained from scratch on {data_name or entry['data']['source']}, shipped with ferlab.
{entry['description']}.

```
ferlab evaluate --pretrained {name}{data_flag} --split test [--tta]
```

| | {SPLIT_LABELS['val']} | {SPLIT_LABELS['test']} |
|:---|---:|---:|
| accuracy | {acc['val']['plain']:.2%} | {acc['test']['plain']:.2%} |
| with flip TTA | {acc['val']['tta']:.2%} | {acc['test']['tta']:.2%} |
| images | {entry['n']['val']:,} | {entry['n']['test']:,} |

Measured on the shipped file (`{entry['file']}`, {entry['dtype']}) by `bench/ship_model.py`, with the command
above. Macro-F1 on PrivateTest: {test['macro_f1']:.3f}.

## Model

- architecture: `{entry['model']}` (`ferlab models`), {entry['params']:,} parameters, {mflops:.1f} MFLOPs per
  48x48 image (forward)
- file: `{entry['file']}`, {entry['size_bytes'] / 1e6:.2f} MB, {entry['dtype']}, sha256 `{entry['sha256']}`
- input: 48x48 grayscale face, normalisation `{json.dumps(meta['preprocess']['normalize'])}`;
  output: {len(classes)} logits for {', '.join(f'{i} {c}' for i, c in enumerate(classes))}

## Data and protocol

- data: `{entry['data']['source']}` (fingerprint `{entry['data']['fingerprint']}`); split sizes
  {', '.join(f'{k} {v:,}' for k, v in sizes.items())}
- protocol: {entry['protocol']}
- selected epoch: {best.get('epoch', '?')} (val accuracy during training {best.get('val_acc', float('nan')):.4f})

## Recipe

- config: {config_line}
- {recipe}
- training: {summary.get('epochs_run', '?')} epochs, {entry['train_minutes']} min of training (sum of epoch
  times in `summary.json`, data loading excluded) on {summary.get('world_size', 1)} x
  {summary.get('device', 'cpu')}; hardware: {entry['hardware']}

<details><summary>full training config</summary>

```json
{json.dumps(train, indent=2)}
```
</details>

## Per-class results on {SPLIT_LABELS['test']}

{recall_table}

## Confusion matrix on {SPLIT_LABELS['test']} (rows: true class, columns: predicted; no TTA)

{cm_table}

![confusion matrix]({png_name})

## Known limits

- {label_limits}
- The demographic balance of FER2013 (age, sex, skin tone, culture) is unknown and was not measured; accuracy
  may differ between groups. Do not use the model to make decisions about people.
- Inputs must look like FER2013: 48x48 grayscale, roughly frontal, face-centred crops. Other poses, lighting,
  occlusion or crops (use ferlab's face detector first) lower accuracy.
- Seven posed/spontaneous expression categories are a coarse model of emotion; an expression is not a feeling.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", metavar="RUN_DIR", help="the run directory (its best.safetensors is shipped)")
    ap.add_argument("--name", required=True, help="the shipped name, e.g. fer-resnet-s-fer2013")
    ap.add_argument("--data", help="fer2013.csv[.gz] to measure on (default: the run's own data)")
    ap.add_argument("--config", help="the config file of the recipe, e.g. configs/fer-resnet-s.toml")
    ap.add_argument("--hardware", default=f"{cpu_name()}, {os.cpu_count()} cores (the machine that shipped it)",
                    help="what the model was trained on, for the card")
    ap.add_argument("--description", help="one line for the manifest (default: the registry's description)")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                    help="stored precision (bf16/fp16: half size; int8: a quarter)")
    ap.add_argument("--default", action="store_true", help="make it the default model (ferlab predict/serve)")
    ap.add_argument("--role", action="append", default=[], help="a shelf role for it (repeatable), e.g. ferplus")
    ap.add_argument("--weights-dir", help="default: $FERLAB_WEIGHTS_DIR, else the package's ferlab/weights")
    ap.add_argument("--docs-dir", default="docs/models", help="where the model card goes")
    args = ap.parse_args(argv)

    import numpy as np

    from ferlab.plots import plot_confusion
    from ferlab.pretrained import weights_dir

    if not all(c.isalnum() or c in "-_." for c in args.name):
        raise SystemExit(f"ship_model: --name {args.name!r} may hold only letters, digits, '-', '_' and '.'")
    wdir = Path(args.weights_dir) if args.weights_dir else weights_dir()
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    summary_path = Path(args.run) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    path, meta, run_data = write_shipped(args.run, args.name, wdir, args.dtype)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {DTYPES[args.dtype]}); measuring it ...", flush=True)
    reports = evaluate_shipped(path, args.data or run_data)
    card = docs / f"{args.name}.md"
    png = docs / f"{args.name}-confusion.png"
    entry = manifest_entry(args.name, path, meta, reports, args, summary, card)
    manifest = update_manifest(wdir, args.name, entry)
    test = reports["test", False]
    plot_confusion(np.array(test["confusion"]), meta["class_names"], png,
                   title=f"{args.name} on PrivateTest (test); accuracy {test['accuracy']:.4f}")
    card.write_text(model_card(args.name, entry, meta, reports, summary, png.name, args.data))

    for split in ("val", "test"):
        a = entry["accuracy"][split]
        print(f"{SPLIT_LABELS[split]:<20} accuracy {a['plain']:.4f}   with flip TTA {a['tta']:.4f}")
    total = sum(p.stat().st_size for p in wdir.glob("*.safetensors")) / 1e6
    print(f"updated {manifest}; wrote {card} and {png}")
    print(f"all shipped weights in {wdir}: {total:.1f} MB (limit {SIZE_LIMIT_MB:g} MB)"
          + ("  OVER THE LIMIT" if total > SIZE_LIMIT_MB else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
