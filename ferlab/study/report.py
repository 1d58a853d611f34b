"""The study report: every section reads the runs' numbers and writes tables, figures and sentences made from them.

Sections are functions ``section(ctx, doc)`` listed in :data:`SECTIONS`, in report order. No sentence states a
conclusion the numbers do not support: each comparison is worded from the sign and size of the difference and
checked against its sampling error (a 95% binomial interval on the test split, or the seed-to-seed spread).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ferlab.study import plots
from ferlab.study.document import Document, Figure, Heading, Para, Table, to_html, to_markdown
from ferlab.study.plan import AUGMENT_AXIS, ROLES
from ferlab.study.runner import RunResult, StudyRuns
from ferlab.transforms import NORMALIZE_MODES


# ----------------------------------------------------------------------------- number formatting
def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def pts(x: float) -> str:
    """A difference of accuracies in percentage points."""
    return f"{100 * x:+.1f} points"


def ci95(acc: float, n: int) -> float:
    """Half-width of the 95% normal-approximation interval of an accuracy measured on ``n`` images."""
    return 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / max(n, 1))


def wilson95(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` observed on ``n`` trials (sane at 0 and 1)."""
    if n <= 0:
        return 0.0, 1.0
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def diff_ci95(a: float, b: float, n: int) -> float:
    """Half-width of the 95% interval of the difference of two accuracies on ``n`` images each (independence)."""
    return 1.96 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1))


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_ms(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}%" if len(values) > 1 else pct(m)


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def compare_phrase(d: float, noise: float, better: str, worse: str) -> str:
    """'A is 3.1 points more accurate than B, beyond the ±1.2-point sampling error' or 'within ...'."""
    if abs(d) <= noise:
        return (f"{better} and {worse} differ by {100 * abs(d):.1f} points, within the ±{100 * noise:.1f}-point "
                "sampling error of the difference: these numbers do not separate them")
    lead, lag = (better, worse) if d > 0 else (worse, better)
    return (f"{lead} is {100 * abs(d):.1f} points more accurate than {lag}, beyond the ±{100 * noise:.1f}-point "
            "sampling error of the difference")


# ----------------------------------------------------------------------------- context
@dataclass
class Context:
    study: StudyRuns
    figdir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.study.data.source

    @property
    def n_test(self) -> int:
        return len(self.study.splits["test"])

    def protocol_note(self, model: str, split: str = "test") -> str:
        """The caption suffix naming model, split and protocol."""
        return (f"model {model}; {split} split of {self.source} ({len(self.study.splits[split]):,} images); "
                "protocol: trained on train, checkpoint selected on val, test used only to report")

    @cached_property
    def best_q1(self) -> RunResult | None:
        """The Q1 CNN with the best val accuracy (chosen on val, never on test)."""
        q1 = self.study.by_role("q1")
        return max(q1, key=lambda r: r.acc("val")) if q1 else None

    def fig(self, name: str) -> Path:
        return self.figdir / name


def _model_stats(r: RunResult) -> dict[str, float]:
    from ferlab.models import create_model
    from ferlab.models.summary import flops_per_image

    m = r.meta["model"]
    model = create_model(m["name"], num_classes=m["num_classes"], in_chans=m["in_chans"], **m.get("args", {}))
    speeds = [h["images_per_s"] for h in r.history]
    return {"trainable": m["params"]["trainable"], "keras_total": m["params"]["keras_total"],
            "mflops": flops_per_image(model) / 1e6, "img_s": float(np.median(speeds)) if speeds else float("nan"),
            "minutes": r.summary["train_seconds_total"] / 60}


# ----------------------------------------------------------------------------- sections
def section_header(ctx: Context, doc: Document) -> None:
    s = ctx.study
    b = s.budget
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in s.splits.items())
    doc.add(Para(f"Budget {b.name}: {b.description}. Data: {ctx.source} (fingerprint {s.data.fingerprint[:12]}); "
                 f"labelled images per split: {sizes}. Protocol: {s.protocol}. Unless a caption says otherwise, "
                 "accuracies are on test, measured once on the checkpoint chosen on val."))
    counts = s.counts
    total = duration(sum(r.summary["train_seconds_total"] for r in s.results))
    doc.add(Para(f"{len(s.results)} training runs: {counts.get('trained', 0)} trained, {counts.get('resumed', 0)} "
                 f"resumed and {counts.get('reused', 0)} reused from the cache ({s.out / 'runs'}); "
                 f"total training time of all runs {total}.", kind="note"))
    if s.data.layout == "synthetic":
        doc.add(Para("These are ferlab's procedurally generated synthetic faces: the report proves that the pipeline "
                     "runs end to end; its numbers say nothing about real faces.", kind="note"))
    for note in b.notes:
        doc.add(Para(f"Note: {note}.", kind="note"))


def section_q1(ctx: Context, doc: Document) -> None:
    runs = ctx.study.by_role("q1")
    doc.add(Heading(ROLES["q1"], anchor="q1"))
    if not runs:
        doc.add(Para("No Q1 runs in this budget."))
        return
    rows, stats = [], {}
    for r in runs:
        st = stats[r.experiment.name] = _model_stats(r)
        a = r.acc("test")
        rows.append([r.experiment.cfg.model, f"{st['trainable']:,}", f"{st['keras_total']:,}", f"{st['mflops']:.1f}",
                     f"{r.summary['epochs_run']} ({r.evaluation.get('selected_epoch')})", duration(60 * st["minutes"]),
                     f"{st['img_s']:.0f}", pct(r.acc("val")), f"{pct(a)} ± {100 * ci95(a, ctx.n_test):.1f}"])
    doc.add(Table(["model", "trainable params", "Keras-style total", "MFLOPs/img", "epochs (selected)",
                   "train time", "train img/s", "val acc", "test acc (95% CI)"], rows,
                  f"Q1 architectures and results; split: val for selection, test for the last column "
                  f"({ctx.n_test:,} images of {ctx.source}); protocol: trained on train, checkpoint selected on val."))
    ranked = sorted(runs, key=lambda r: r.acc("test"), reverse=True)
    if len(ranked) > 1:
        a, b = ranked[0], ranked[1]
        sa, sb = stats[a.experiment.name], stats[b.experiment.name]
        d = a.acc("test") - b.acc("test")
        doc.add(Para(
            f"On test, {a.experiment.cfg.model} scores {pct(a.acc('test'))} and {b.experiment.cfg.model} "
            f"{pct(b.acc('test'))}: {compare_phrase(d, diff_ci95(a.acc('test'), b.acc('test'), ctx.n_test), a.experiment.cfg.model, b.experiment.cfg.model)}. "  # noqa: E501
            f"{a.experiment.cfg.model} has {fmt_params(sa['trainable'])} parameters and needs {sa['mflops']:.0f} "
            f"MFLOPs per image ({sa['mflops'] / max(sb['mflops'], 1e-9):.2f}x {b.experiment.cfg.model}'s); it "
            f"trained for {duration(60 * sa['minutes'])} against {duration(60 * sb['minutes'])}."))
    for r in runs:
        path = ctx.fig(f"q1-curves-{r.experiment.cfg.model}.png")
        from ferlab.plots import plot_history

        plot_history(r.history, path, title=f"{r.experiment.cfg.model}: train vs val")
        doc.add(Figure(path, f"Training curves of {r.experiment.cfg.model}: accuracy and loss per epoch on the train "
                             f"split (augmented batches) and the val split of {ctx.source}; the checkpoint of epoch "
                             f"{r.evaluation.get('selected_epoch')} (best val accuracy) is the one reported.", 900))


def section_q2(ctx: Context, doc: Document) -> None:
    doc.add(Heading(ROLES["q2"], anchor="q2"))
    mlps = ctx.study.by_role("q2")
    if not mlps:
        doc.add(Para("No Q2 run in this budget."))
        return
    mlp = mlps[0]
    target = mlp.experiment.tags.get("matched_to")
    cnns = [r for r in ctx.study.by_role("q1") if r.experiment.cfg.model == target]
    if not cnns:
        doc.add(Para(f"The CNN {target} that the MLP is matched to was not trained in this budget."))
        return
    cnn = cnns[0]
    sc, sm = _model_stats(cnn), _model_stats(mlp)
    path = plots.curves_side_by_side({f"CNN {target}": cnn.history, "MLP mlp-matched": mlp.history},
                                     ctx.fig("q2-curves.png"), "same recipe, same data; train dashed, val solid")
    doc.add(Figure(path, f"Q2 training curves side by side: CNN {target} (left) and the parameter-matched MLP "
                         f"(right), train and val splits of {ctx.source}, same training recipe.", 950))
    rows = []
    for name, r, s in ((f"CNN {target}", cnn, sc), ("MLP mlp-matched", mlp, sm)):
        last = r.history[-1] if r.history else {"train_acc": float("nan"), "val_acc": float("nan")}
        rows.append([name, f"{s['trainable']:,}", f"{s['mflops']:.1f}", pct(last["train_acc"]), pct(last["val_acc"]),
                     f"{100 * (last['train_acc'] - last['val_acc']):.1f}", pct(r.acc("val")), pct(r.acc("test"))])
    doc.add(Table(["model", "trainable params", "MFLOPs/img", "train acc (last epoch)", "val acc (last epoch)",
                   "train - val (points)", "val acc (selected)", "test acc"], rows,
                  f"Q2: CNN against the MLP with the same number of parameters; {ctx.protocol_note('both')}."))
    ac, am = cnn.acc("test"), mlp.acc("test")
    d, noise = ac - am, diff_ci95(ac, am, ctx.n_test)
    hidden = mlp.meta["model"].get("args", {})
    text = [f"The MLP has {sm['trainable']:,} trainable parameters, {sm['trainable'] / sc['trainable']:.3f}x the "
            f"CNN's {sc['trainable']:,} (matched to {target}{', ' + json.dumps(hidden) if hidden else ''}), and "
            f"needs {sm['mflops']:.1f} MFLOPs per image against the CNN's {sc['mflops']:.1f}.",
            f"On test the CNN scores {pct(ac)} and the MLP {pct(am)}: "
            f"{compare_phrase(d, noise, 'the CNN', 'the MLP')}."]
    if d > noise:
        text.append("With the parameter budget held equal, the difference comes from how the parameters are used: "
                    "a convolution applies the same small filters at every position of the face, so a pattern such "
                    "as a mouth corner is learnt once and found wherever it appears, while every weight of the MLP's "
                    "first layer is tied to one pixel position and each pattern must be learnt again at each place.")
    elif d < -noise:
        text.append("This contradicts the usual expectation that weight sharing helps on images; with so short a "
                    "training the ranking may change with more epochs.")
    gc = cnn.history[-1]["train_acc"] - cnn.history[-1]["val_acc"] if cnn.history else float("nan")
    gm = mlp.history[-1]["train_acc"] - mlp.history[-1]["val_acc"] if mlp.history else float("nan")
    if np.isfinite(gc) and np.isfinite(gm):
        text.append(gap_sentence(gm, gc))
    doc.add(Para(" ".join(text)))


def gap_sentence(gap_mlp: float, gap_cnn: float) -> str:
    """What the last epoch's train-minus-val accuracy gaps (fractions) say about overfitting: a larger gap is
    named only when a gap is positive and the two differ by a point or more."""
    gaps = (f"At the last epoch, train accuracy (on augmented batches, during the epoch) minus val accuracy "
            f"is {100 * gap_mlp:+.1f} points for the MLP and {100 * gap_cnn:+.1f} for the CNN")
    if max(gap_mlp, gap_cnn) <= 0:
        return (f"{gaps}: neither fits its training images better than the val faces, so neither shows overfitting "
                "at this length.")
    if abs(gap_mlp - gap_cnn) < 0.01:
        return f"{gaps}: about the same gap, the sign of fitting the training images more than generalising, for both."
    larger = "the MLP's" if gap_mlp > gap_cnn else "the CNN's"
    return f"{gaps}; the larger gap, the sign of fitting the training images more than generalising, is {larger}."


def section_q3(ctx: Context, doc: Document) -> None:
    doc.add(Heading(ROLES["q3"], anchor="q3"))
    runs = ctx.study.by_role("q3")
    if not runs:
        doc.add(Para("No Q3 runs in this budget."))
        return
    cols = list(AUGMENT_AXIS)
    acc: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        acc.setdefault((r.experiment.tags["normalize"], r.experiment.tags["augment"]), []).append(r.acc("test"))
    seeds = sorted({r.experiment.tags["seed"] for r in runs})
    model = runs[0].experiment.cfg.model
    epochs = runs[0].experiment.cfg.epochs
    norms = [n for n in NORMALIZE_MODES if any((n, c) in acc for c in cols)]
    mean = np.array([[mean_std(acc.get((n, c), [np.nan]))[0] for c in cols] for n in norms])
    std = np.array([[mean_std(acc.get((n, c), [np.nan]))[1] for c in cols] for n in norms])
    spread = "mean ± std over seeds " + ", ".join(map(str, seeds)) if len(seeds) > 1 else f"one seed, {seeds[0]}"
    doc.add(Table(["normalisation"] + [f"augmentation {c} ({AUGMENT_AXIS[c]})" for c in cols],
                  [[n] + [fmt_ms(acc[(n, c)]) if (n, c) in acc else "-" for c in cols] for n in norms],
                  f"Q3 test accuracy ({spread}) of {model} trained {epochs} epoch{'s' if epochs != 1 else ''} per "
                  f"cell, same seeds in every cell; {ctx.protocol_note(model)}."))
    path = plots.grouped_bars(norms, [f"augmentation {c}" for c in cols], 100 * mean, 100 * std,
                              ctx.fig("q3-bars.png"), "test accuracy (%)", f"{model}: normalisation x augmentation")
    bars = "; error bars: std over seeds" if len(seeds) > 1 else ""
    doc.add(Figure(path, f"Q3 test accuracy per normalisation and augmentation ({spread}{bars}); "
                         f"{ctx.protocol_note(model)}.", 700))
    convergence = _q3_curves(ctx, doc, runs, model)
    # sentences from the numbers
    i, j = np.unravel_index(np.nanargmax(mean), mean.shape)
    k, m = np.unravel_index(np.nanargmin(mean), mean.shape)
    noise = (float(np.nanmean(std[std > 0])) if (std > 0).any() else ci95(float(np.nanmean(mean)), ctx.n_test))
    noise_txt = ("the mean seed-to-seed standard deviation" if (std > 0).any()
                 else "the 95% sampling error of one accuracy")
    text = [f"The best cell is normalisation {norms[i]} with augmentation {cols[j]} ({pct(mean[i, j])}), the worst "
            f"{norms[k]} with augmentation {cols[m]} ({pct(mean[k, m])})."]
    if len(cols) == 2:
        gains = mean[:, 1] - mean[:, 0]
        g = float(np.nanmean(gains))
        verdict = "more than" if abs(g) > noise else "within"
        text.append(f"Switching augmentation on changes test accuracy by {pts(g)} on average over the "
                    f"normalisations (from {pts(float(np.nanmin(gains)))} to {pts(float(np.nanmax(gains)))}), "
                    f"{verdict} {noise_txt} ({100 * noise:.1f} points).")
    by_norm = np.nanmean(mean, axis=1)
    order = np.argsort(-by_norm)
    text.append("Averaged over augmentation, the normalisations rank " + ", ".join(
        f"{norms[o]} {pct(by_norm[o])}" for o in order) + f"; the range of {100 * (by_norm.max() - by_norm.min()):.1f} "
        f"points is {'more than' if by_norm.max() - by_norm.min() > noise else 'within'} {noise_txt}.")
    text.append(convergence)
    doc.add(Para(" ".join(text)))


CONVERGED_POINTS = 0.5  # a cell whose best val accuracy rose less than this over its last LATE_SHARE of epochs
LATE_SHARE = 0.2


def late_gain(val_acc: list[float], share: float = LATE_SHARE) -> tuple[float, int]:
    """How much the best val accuracy so far rose over the last ``share`` of the epochs, and how many epochs
    that is (at least one; 0 gain for a single epoch)."""
    n = len(val_acc)
    late = max(1, round(share * n))
    if n <= late:
        return 0.0, n
    return max(val_acc) - max(val_acc[: n - late]), late


def _q3_curves(ctx: Context, doc: Document, runs: list[RunResult], model: str) -> str:
    """The Q3 cells' validation curves (mean over seeds) and a sentence on whether each converged."""
    curves: dict[str, list[list[float]]] = {}
    for r in runs:
        name = f"{r.experiment.tags['normalize']}, augmentation {r.experiment.tags['augment']}"
        curves.setdefault(name, []).append([row["val_acc"] for row in r.history])
    length = min(len(c) for cs in curves.values() for c in cs)
    if length < 2:
        return ""
    mean = {name: 100 * np.mean([c[:length] for c in cs], axis=0) for name, cs in curves.items()}
    colour = {norm: f"C{i}" for i, norm in enumerate(NORMALIZE_MODES)}  # one colour per normalisation
    styles = {name: colour.get(name.split(",")[0], "") + ("o-" if name.endswith("on") else "o--") for name in mean}
    path = plots.lines(range(1, length + 1), mean, ctx.fig("q3-curves.png"), "epoch", "val accuracy (%)",
                       f"{model}: validation accuracy per Q3 cell", styles)
    doc.add(Figure(path, "Q3 validation accuracy per epoch, mean over seeds (a colour per normalisation; solid: "
                         "augmentation on, dashed: off): "
                         "the curves show whether each cell had converged when its schedule ended.", 700))
    gains = {name: late_gain(list(curve)) for name, curve in mean.items()}
    worst = max(gains, key=lambda name: gains[name][0])
    gain, late = gains[worst]
    hint = "" if ctx.study.budget.name == "long" else " (`--budget long`)"
    if gain < CONVERGED_POINTS:
        return (f"Every cell had converged: over its last {late} epoch{'s' if late != 1 else ''} the best val "
                f"accuracy rose by at most {gain:.1f} points ({worst}), so these conclusions hold at this length "
                f"({length} epochs).")
    return (f"Not every cell had converged: over the last {late} epoch{'s' if late != 1 else ''} the best val "
            f"accuracy of {worst} still rose by {gain:.1f} points, so these conclusions hold for {length}-epoch "
            f"schedules only; longer runs{hint} may change them.")


def section_q4(ctx: Context, doc: Document) -> None:
    doc.add(Heading("Q4: which classes are confused", anchor="q4"))
    r = ctx.best_q1
    if r is None:
        doc.add(Para("No Q1 model to analyse."))
        return
    from ferlab.plots import plot_confusion

    model = r.experiment.cfg.model
    ev = r.evaluation["test"]
    names = list(ctx.study.data.class_names)
    path = ctx.fig("q4-confusion.png")
    plot_confusion(np.array(ev["confusion"]), names, path, title=f"{model} on test; accuracy {ev['accuracy']:.3f}")
    doc.add(Para(f"The model analysed here and in Q5/Q6 is {model}, the Q1 net with the best val accuracy "
                 f"({pct(r.acc('val'))})."))
    doc.add(Figure(path, f"Confusion matrix (counts and row-normalised: recall per true class); "
                         f"{ctx.protocol_note(model)}.", 950))
    pc = ev["per_class"]
    doc.add(Table(["class", "test images", "precision", "recall", "F1"],
                  [[c, f"{v['support']:,}", pct(v["precision"]), pct(v["recall"]), pct(v["f1"])]
                   for c, v in pc.items()],
                  f"Per-class precision, recall and F1; {ctx.protocol_note(model)}."))
    present = {c: v for c, v in pc.items() if v["support"] > 0}
    best = max(present, key=lambda c: present[c]["recall"])
    worst = min(present, key=lambda c: present[c]["recall"])
    rare = min(present, key=lambda c: present[c]["support"])
    text = [f"{model} recognises {best} best (recall {pct(present[best]['recall'])} of "
            f"{present[best]['support']} test faces) and {worst} worst (recall {pct(present[worst]['recall'])})."]
    if present[rare]["support"] < 100:
        lo, hi = wilson95(present[rare]["recall"], present[rare]["support"])
        text.append(f"{rare} has only {present[rare]['support']} test images: its recall of "
                    f"{pct(present[rare]['recall'])} has a 95% interval of {pct(lo)} to {pct(hi)}.")
    conf = ev["most_confused"]
    norm = np.array(ev["confusion_normalized"])
    idx = {c: i for i, c in enumerate(names)}
    for c in conf[:3]:
        back = norm[idx[c["predicted"]], idx[c["true"]]]
        text.append(f"{pct(c['rate'])} of the {c['true']} faces ({c['count']} of {pc[c['true']]['support']}) are "
                    f"predicted as {c['predicted']}" + (f", and {pct(back)} of {c['predicted']} as {c['true']}"
                                                        if back > 0 else "") + ".")
    if not conf:
        text.append("No test face is misclassified.")
    doc.add(Para(" ".join(text)))


def section_q5(ctx: Context, doc: Document) -> None:
    doc.add(Heading("Q5: where the model looks (saliency, Grad-CAM) and whether the maps are faithful", anchor="q5"))
    r = ctx.best_q1
    if r is None:
        doc.add(Para("No CNN to explain."))
        return
    from ferlab.study.explain import explain_examples, faithfulness_scores

    model_name = r.experiment.cfg.model
    b = ctx.study.budget
    rows = explain_examples(r, ctx.study)
    path = plots.example_maps(rows, ctx.fig("q5-examples.png"), f"{model_name}: maps for the predicted class")
    n_right = sum(row["right"] is not None for row in rows)
    n_wrong = sum(row["wrong"] is not None for row in rows)
    doc.add(Figure(path, f"Saliency (|gradient|) and Grad-CAM (last conv map) for the predicted class, on the first "
                         f"correctly (left) and wrongly (right) classified test face of each class ({n_right} right, "
                         f"{n_wrong} wrong examples); mask: pixels with Grad-CAM >= 0.7 kept, others set to the "
                         f"image mean; {ctx.protocol_note(model_name)}.", 1000))
    scores, curves, fractions, n = faithfulness_scores(r, ctx.study, ("saliency", "gradcam"), b.explain_images,
                                                        b.explain_steps)
    rows_t = [[m, f"{s['deletion_auc']:.3f}", f"{s['deletion_random_auc']:.3f}", f"{s['insertion_auc']:.3f}",
               f"{s['insertion_random_auc']:.3f}", f"{s['deletion_gain']:+.3f} ± {2 * s['deletion_gain_se']:.3f}",
               f"{s['insertion_gain']:+.3f} ± {2 * s['insertion_gain_se']:.3f}"]
              for m, s in scores.items()]
    doc.add(Table(["method", "deletion AUC", "random deletion AUC", "insertion AUC", "random insertion AUC",
                   "deletion gain (± 2 SE)", "insertion gain (± 2 SE)"], rows_t,
                  f"Faithfulness on the first {n} test faces: area under the probability of the predicted class as "
                  f"pixels are removed (deletion, lower is better) or inserted (insertion, higher is better) in the "
                  f"map's order, against a random order; gain > 0: better than random (± twice the standard error "
                  f"over the images); {ctx.protocol_note(model_name)}."))
    path = plots.faithfulness_curves(fractions, curves, ctx.fig("q5-faithfulness.png"),
                                     f"{model_name}: deletion and insertion, mean over {n} test faces")
    doc.add(Figure(path, f"Mean deletion and insertion curves (solid: map order, dotted: random order); "
                         f"{ctx.protocol_note(model_name)}.", 950))
    text = []
    for m, s in scores.items():
        sig = {k: s[k] > 2 * s[f"{k}_se"] for k in ("deletion_gain", "insertion_gain")}
        verdict = ("ranks pixels measurably better than a random order on both curves" if all(sig.values()) else
                   "is not measurably better than a random order" if not any(sig.values()) else
                   "beats a random order measurably on one curve only")
        text.append(f"{m} {verdict} (deletion AUC {s['deletion_auc']:.3f} against {s['deletion_random_auc']:.3f} "
                    f"random; insertion {s['insertion_auc']:.3f} against {s['insertion_random_auc']:.3f}).")
    text.append("'Measurably' means a mean gain above twice its standard error over the images.")
    if len(scores) == 2:
        (m1, s1), (m2, s2) = scores.items()
        tot = {m: s["deletion_gain"] + s["insertion_gain"] for m, s in scores.items()}
        se = math.sqrt(sum(s[f"{k}_se"] ** 2 for s in (s1, s2) for k in ("deletion_gain", "insertion_gain")))
        hi, lo = sorted(tot, key=tot.get, reverse=True)
        if tot[hi] - tot[lo] > 2 * se:
            text.append(f"Summing both gains, {hi} is the more faithful map here ({tot[hi]:+.3f} against "
                        f"{tot[lo]:+.3f}).")
        else:
            text.append(f"Summing both gains ({hi} {tot[hi]:+.3f}, {lo} {tot[lo]:+.3f}), the two maps are not "
                        "measurably different in faithfulness here.")
    doc.add(Para(" ".join(text)))


def section_q6(ctx: Context, doc: Document) -> None:
    doc.add(Heading("Q6: what the filters respond to", anchor="q6"))
    r = ctx.best_q1
    if r is None:
        doc.add(Para("No CNN to visualise."))
        return
    from ferlab.study.explain import feature_map_figure, filter_figure

    model_name = r.experiment.cfg.model
    b = ctx.study.budget
    path, layer, text = filter_figure(r, ctx.study, ctx.fig("q6-filters.png"), b.filter_count, b.filter_steps)
    doc.add(Figure(path, f"Inputs that maximise the mean activation of the {b.filter_count} filters of layer "
                         f"{layer} most active on test faces of {model_name} (gradient ascent from grey noise, "
                         f"{b.filter_steps} steps, with jitter/blur regularisers); model trained on the train split "
                         f"of {ctx.source}.", 900))
    doc.add(Para(text))
    path, layer, caption = feature_map_figure(r, ctx.study, ctx.fig("q6-feature-maps.png"))
    doc.add(Figure(path, f"Outputs of layer {layer} of {model_name} on {caption} (one tile per channel, each "
                         f"with its own grey scale); {ctx.protocol_note(model_name)}.", 900))


def _ensemble_members(ctx: Context) -> tuple[list[RunResult], list[RunResult]]:
    """The Q1-Q3 runs ranked by val accuracy, and those left out because their probabilities are not finite."""
    runs = [r for role in ("q1", "q2", "q3") for r in ctx.study.by_role(role)]
    finite = [r for r in runs if all(np.isfinite(r.probs(s)).all() for s in ("val", "test"))]
    return sorted(finite, key=lambda r: r.acc("val"), reverse=True), [r for r in runs if r not in finite]


def section_ensembles(ctx: Context, doc: Document) -> None:
    from ferlab.evaluate import classification_metrics

    doc.add(Heading("Ensembles: accuracy against the number of members", anchor="ensembles"))
    members, diverged = _ensemble_members(ctx)
    if diverged:
        doc.add(Para("Left out of the ensembles (non-finite outputs, a diverged training): "
                     + ", ".join(r.experiment.name for r in diverged) + ".", kind="note"))
    if len(members) < 2:
        doc.add(Para("Fewer than two runs: no ensemble."))
        return
    names = list(ctx.study.data.class_names)
    y = {s: ctx.study.labels(s) for s in ("val", "test")}
    sums = {s: np.zeros((len(y[s]), len(names))) for s in y}
    curve: dict[str, list[float]] = {"val": [], "test": []}
    rows = []
    for n, r in enumerate(members, 1):
        for s in y:
            sums[s] += r.probs(s)
            curve[s].append(classification_metrics(y[s], sums[s] / n, names)["accuracy"])
        rows.append([str(n), f"{r.experiment.name} ({r.experiment.cfg.model})", pct(r.acc("val")),
                     pct(curve["val"][-1]), pct(curve["test"][-1])])
    ns = list(range(1, len(members) + 1))
    path = plots.lines(ns, {"val (selection)": [100 * v for v in curve["val"]],
                            "test": [100 * v for v in curve["test"]]}, ctx.fig("ensembles.png"),
                       "members (best val accuracy first)", "accuracy of the averaged probabilities (%)",
                       "ensemble accuracy against number of members")
    doc.add(Figure(path, f"Ensembles of the first n runs of Q1-Q3 ranked by val accuracy (softmax probabilities "
                         f"averaged); val and test splits of {ctx.source}; protocol: members and n chosen on val, test "
                         "only reported.", 700))
    doc.add(Table(["n", "member added", "its val acc", "ensemble val acc", "ensemble test acc"], rows,
                  f"Ensemble of the n best runs by val accuracy; {ctx.protocol_note('Q1-Q3 runs')}."))
    best_n = int(np.argmax(curve["val"])) + 1
    single, chosen, full = curve["test"][0], curve["test"][best_n - 1], curve["test"][-1]
    doc.add(Para(
        f"The best single run by val accuracy ({members[0].experiment.name}) scores {pct(single)} on test. On val the "
        f"ensemble peaks at n = {best_n} ({pct(curve['val'][best_n - 1])}); that ensemble scores "
        f"{pct(chosen)} on test, {pts(chosen - single)} against the single run ("
        f"{'beyond' if abs(chosen - single) > diff_ci95(chosen, single, ctx.n_test) else 'within'} the "
        f"±{100 * diff_ci95(chosen, single, ctx.n_test):.1f}-point sampling error). All {len(members)} runs together "
        f"score {pct(full)}."))


def section_kfold(ctx: Context, doc: Document) -> None:
    doc.add(Heading("Stratified k-fold cross-validation", anchor="kfold"))
    runs = ctx.study.by_role("kfold")
    if not runs:
        doc.add(Para("No k-fold runs in this budget."))
        return
    k = runs[0].experiment.tags["k"]
    model = runs[0].experiment.cfg.model
    rows = []
    for r in runs:
        sz = r.meta["split"]["sizes"]
        rows.append([str(r.experiment.tags["fold"] + 1), f"{sz['train']:,}", f"{r.evaluation['fold']['n']:,}",
                     pct(r.acc("fold")), pct(r.acc("val")), pct(r.acc("test"))])
    folds = [r.acc("fold") for r in runs]
    tests = [r.acc("test") for r in runs]
    rows.append(["mean ± std", "", "", fmt_ms(folds), fmt_ms([r.acc("val") for r in runs]), fmt_ms(tests)])
    doc.add(Table(["fold", "train images", "held-out images", "held-out acc", "val acc", "test acc"], rows,
                  f"{k}-fold stratified cross-validation of {model} on the train split of {ctx.source}: each model "
                  f"trains on {k - 1} folds, is selected on val, and is scored on its held-out fold and on test."))
    text = [f"{k}-fold cross-validation estimates the accuracy of {model} ({runs[0].experiment.cfg.epochs} epochs) at "
            f"{fmt_ms(folds)} (mean ± std over the held-out folds); the same {k} models score {fmt_ms(tests)} on test."]
    ref_cfg = {kk: v for kk, v in runs[0].experiment.cfg.to_dict().items() if kk != "data"}
    same = [r for r in ctx.study.results if r.experiment.role != "kfold"
            and {kk: v for kk, v in r.experiment.cfg.to_dict().items() if kk != "data"} == ref_cfg]
    if same:
        text.append(f"The run with the same recipe trained on the whole train split ({same[0].experiment.name}) "
                    f"scores {pct(same[0].acc('test'))} on test.")
    doc.add(Para(" ".join(text)))


SECTIONS: list[Callable[[Context, Document], None]] = [
    section_header, section_q1, section_q2, section_q3, section_q4, section_q5, section_q6, section_ensembles,
    section_kfold,
]


def write_report(study: StudyRuns) -> dict[str, Path]:
    """Write ``OUT/report.md`` (figures linked from OUT/figures) and the self-contained ``OUT/report.html``."""
    out = study.out
    ctx = Context(study, out / "figures")
    ctx.figdir.mkdir(parents=True, exist_ok=True)
    doc = Document(f"ferlab study ({study.budget.name}) on {study.data.source}")
    for section in SECTIONS:
        section(ctx, doc)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(doc, out))
    page.write_text(to_html(doc))
    return {"markdown": md, "html": page}
