"""Procedurally generated synthetic faces: the embedded default dataset.

Why this exists
---------------
ferlab must run end to end on a fresh machine and in CI, where FER2013 (or any other real
face data) is not available. ``make_synthetic`` draws a small FER-shaped dataset (48x48 gray
faces, the 7 FER2013 classes, train/val/test splits) from a fixed seed in about a second, with
no download and no files.

It is **no substitute for real data**. The faces are cartoons: an oval on a background whose
mouth, eyes and brows are moved by a hand-written rule per class (loosely after the usual FER
cues, see ``_PROTOTYPES``). Accuracy on synthetic faces says nothing about accuracy on real faces;
use it to check that code runs, that models learn, and to compare methods on a known problem.

What is drawn
-------------
Each face is rendered in a face-aligned "canonical" frame with numpy (vectorised over a batch)
and then warped into the 48x48 image with a random pose (rotation, scale, shift). Expression:

====================  ==========================================================================
class                 cues (at full intensity)
====================  ==========================================================================
0 Angry               brows lowered and drawn into a V, narrowed eyes, thin tight mouth
1 Disgust             one-sided raised upper lip (sneer), lowered brows, nose wrinkle, squint
2 Fear                brows raised with inner ends up, wide eyes, wide stretched open mouth
3 Happy               upturned mouth (often showing teeth), smile folds, slightly narrowed eyes
4 Sad                 downturned mouth, inner brow ends raised, slightly lowered eyes
5 Surprise            brows raised high, wide eyes, round open "O" mouth
6 Neutral             everything at rest
====================  ==========================================================================

Classes overlap on purpose, roughly as in real data: every sample has a random expression
intensity (weak expressions drift towards Neutral), part of a "confusable partner" expression
mixed in (Fear<->Surprise, Angry<->Disgust, Sad<->Neutral, Happy->Neutral), and per-person
jitter of every expression parameter, so even a perfect reader of the drawn parameters tops out
near 99% at difficulty 1. Nuisance: face size/shape/feature placement, skin tone, hair,
background, mottled texture, pose (rotation up to +-15 degrees, scale, shift), lighting
gradient, contrast/brightness, blur, Gaussian noise and occluders (arm/hand-like bars, blobs).
Disgust is rarer (40% of each other class), as it is in FER2013 (where it is rarer still).

``difficulty`` scales nuisance and overlap (0: no pose, lighting, noise, occluders or jitter,
only the intensity spread and skin texture; 0.5 easier; 1.0 the calibrated default; 2.0 much
harder). Calibration at 1.0 (small CNN 32-64-128 with BatchNorm, Adam 1e-3, batch 64, inputs in
[0, 1]): val accuracy ~47% after epoch 1, ~84% after 5 epochs, ~87% after 7 and still rising
slowly (BatchNorm statistics re-estimated after each epoch; with the running averages of a
constant-rate Adam run the per-epoch figure swings 10-30 points lower, e.g.
31/42/51/64/67/50/80%). Logistic regression on the pixels reaches ~64% and an MLP ~55%: the
faces are not aligned to the pixel grid. At 0.5 the CNN passes 90% within
2 epochs (a linear model ~92% too); at 2.0 it is near 43% after 3.

Same arguments -> bitwise identical output on a given machine and numpy/OpenCV build, whatever the
thread count (float rounding in numpy's vectorised math may differ between builds or CPUs).
"""

from __future__ import annotations

import hashlib
import json
from statistics import NormalDist

import cv2
import numpy as np

from ferlab import CLASS_NAMES
from ferlab.data.types import SPLITS, FerData

__all__ = ["CLASS_WEIGHTS", "SYNTHETIC_VERSION", "make_synthetic", "synthetic_fingerprint"]

SYNTHETIC_VERSION = 1
"""Bump whenever the generator's output for given arguments changes."""

IMG = 48
"""Image side in pixels."""

CLASS_WEIGHTS = np.array([1.0, 0.4, 1.0, 1.0, 1.0, 1.0, 1.0])
"""Relative class frequencies (Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral)."""

# ---- expression parameters -------------------------------------------------------------------
# Each expression is a vector of deltas from the neutral face.
_PARAMS = (
    "brow_raise",   # + both brows up
    "brow_inner",   # + inner brow ends up (sad / fear), - down into a V (angry)
    "brow_asym",    # + one brow higher than the other
    "eye_open",     # + wider eyes, - narrower
    "mouth_curve",  # + corners up (smile), - corners down (frown)
    "mouth_open",   # + open mouth
    "mouth_width",  # + wider, - narrower
    "sneer",        # + one-sided raised upper lip
    "lip_thin",     # + pressed, thin lips
    "fold",         # + nasolabial (smile) folds
    "wrinkle",      # + nose-bridge wrinkles
    "cheek",        # + raised cheeks (lit "apples" under the eyes)
)
_P = {name: i for i, name in enumerate(_PARAMS)}

_PROTOTYPES = np.array(
    [
        # raise inner  asym   eye  curve  open  width sneer  thin  fold  wrinkle cheek
        [-0.80, -1.00, 0.00, -0.45, -0.15, 0.00, -0.15, 0.00, 0.80, 0.00, 0.50, 0.00],  # Angry
        [-0.45, -0.45, 0.50, -0.40, -0.35, 0.20, -0.05, 1.00, 0.00, 0.80, 1.00, 0.60],  # Disgust
        [0.80, 0.70, 0.00, 0.60, -0.35, 0.55, 0.30, 0.00, 0.20, 0.00, 0.00, 0.00],  # Fear
        [0.10, 0.00, 0.00, -0.20, 1.00, 0.35, 0.30, 0.00, 0.00, 0.70, 0.00, 1.00],  # Happy
        [0.00, 0.90, 0.00, -0.20, -0.85, 0.00, -0.10, 0.00, 0.20, 0.00, 0.00, 0.00],  # Sad
        [1.10, 0.10, 0.00, 0.65, 0.00, 1.00, -0.35, 0.00, 0.00, 0.00, 0.00, 0.00],  # Surprise
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00],  # Neutral
    ],
    dtype=np.float64,
)
# Which expression each class is most often mistaken for (partly mixed into its samples).
_PARTNER = np.array([1, 0, 5, 6, 6, 2, 4])
# Per-parameter scale of the person-to-person jitter.
_JITTER = np.array([0.30, 0.30, 0.25, 0.22, 0.25, 0.18, 0.15, 0.25, 0.30, 0.25, 0.25, 0.25])

# ---- canonical (face-aligned) frame ---------------------------------------------------------
# Units: the face's half-width is ~1; v points down; R canonical pixels per unit.
_R = 18.0
_CW, _CH = 49, 56
_U0 = -(_CW - 1) / 2 / _R
_V0 = -1.62
_U = (_U0 + np.arange(_CW) / _R).astype(np.float32)
_V = (_V0 + np.arange(_CH) / _R).astype(np.float32)


def _rows(v_lo: float, v_hi: float) -> slice:
    return slice(max(0, int(np.floor((v_lo - _V0) * _R))), min(_CH, int(np.ceil((v_hi - _V0) * _R)) + 1))


def _cols(u_lo: float, u_hi: float) -> slice:
    return slice(max(0, int(np.floor((u_lo - _U0) * _R))), min(_CW, int(np.ceil((u_hi - _U0) * _R)) + 1))


def _cov(sd: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (canonical units, < 0 inside), 1 px ramp."""
    out = np.multiply(sd, -_R, dtype=np.float32)
    out += 0.5
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _lin_cov(x: np.ndarray, k: np.ndarray | float, c0: np.ndarray | float) -> np.ndarray:
    """clip(c0 - k * x, 0, 1): coverage when the signed distance is linear in x."""
    out = np.multiply(x, -k, dtype=np.float32)
    out += c0
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _col(x: np.ndarray) -> np.ndarray:
    """Per-sample values as a (B, 1, 1) float32 array."""
    return np.asarray(x, dtype=np.float32)[:, None, None]


# ---- drawing parameters ----------------------------------------------------------------------


def _split_counts(n: int, weights: np.ndarray) -> np.ndarray:
    """Per-class counts summing to n, proportional to weights, each class >= 1 when n >= 7."""
    p = weights / weights.sum()
    raw = n * p
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    if n >= len(weights):
        while (counts == 0).any():
            counts[np.argmax(counts)] -= 1
            counts[np.argmin(counts)] += 1
    return counts


def _draw_params(rng: np.random.Generator, labels: np.ndarray, d: float) -> dict[str, np.ndarray]:
    """All per-sample random parameters, drawn up front in a fixed order."""
    n = len(labels)
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    g = lambda s: rng.normal(0.0, s, n)  # noqa: E731
    dd = min(d, 1.5)
    p: dict[str, np.ndarray] = {}
    # expression: intensity x (prototype mixed with its partner) + person jitter
    lo = float(np.clip(0.70 - 0.40 * d, 0.0, 0.9))
    intensity = lo + (1.0 - lo) * rng.beta(2.5, 1.0, n)
    mix = rng.uniform(0.0, 1.0, n) * min(0.45, 0.25 * d)
    proto = _PROTOTYPES[labels] * (1.0 - mix[:, None]) + _PROTOTYPES[_PARTNER[labels]] * mix[:, None]
    expr = intensity[:, None] * proto + rng.normal(0.0, 1.0, (n, len(_PARAMS))) * _JITTER * (0.5 * d)
    p["expr"] = expr
    p["sneer_side"] = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    p["teeth"] = (rng.random(n) < 0.6).astype(np.float64) * np.clip(expr[:, _P["mouth_open"]] * 3 - 0.3, 0, 1)
    p["gaze_u"] = g(0.025)
    p["gaze_v"] = g(0.012)
    # face shape / identity
    p["face_a"] = u(0.90, 1.06)
    p["face_b"] = u(1.20, 1.36)
    p["chin"] = u(0.10, 0.30)
    p["eye_x"] = u(0.33, 0.40)
    p["eye_y"] = u(-0.18, -0.06)
    p["eye_w"] = u(0.16, 0.20)
    p["brow_y"] = u(-0.46, -0.34)
    p["brow_t"] = u(0.055, 0.085)
    p["mouth_y"] = u(0.54, 0.70)
    p["mouth_w"] = u(0.36, 0.44)
    jaw = np.clip(expr[:, _P["mouth_open"]], 0.0, 1.6)  # an open mouth drops the jaw: longer face
    p["face_b"] += 0.10 * jaw
    p["mouth_y"] += 0.05 * jaw
    p["skin"] = u(95.0, 215.0)
    p["shade"] = u(0.05, 0.25)
    p["brow_dark"] = u(0.55, 0.85)
    p["hair_type"] = rng.choice(3, n, p=[0.2, 0.5, 0.3])  # 0 short/bald, 1 cap, 2 long
    p["hair_tone"] = np.where(rng.random(n) < 0.75, u(15.0, 90.0), u(90.0, 200.0))
    p["strand_f"] = u(12.0, 30.0)
    p["hairline"] = u(-0.95, -0.70) + np.where(rng.random(n) < 0.12 * dd, u(0.15, 0.35), 0.0)
    # background
    p["bg"] = u(15.0, 240.0)
    p["bg_tex"] = rng.normal(0.0, 1.0, (n, 4, 4)) * u(0.0, 30.0)[:, None, None]
    # mottled texture over the whole image (skin, hair, background): mid-frequency noise
    p["tex"] = u(3.0, 9.0)
    # pose
    p["rot"] = u(-15.0, 15.0) * dd
    p["scale"] = u(17.0, 21.0) * np.exp(g(0.03 * dd))
    p["dx"] = u(-3.0, 3.0) * dd
    p["dy"] = u(-3.0, 3.0) * dd
    # photometric
    phi = u(0.0, 2 * np.pi)
    grad = u(0.0, 0.20) * dd
    p["grad_x"], p["grad_y"] = grad * np.cos(phi), grad * np.sin(phi)
    p["contrast"] = np.exp(g(0.10 * dd))
    p["bright"] = g(7.0 * dd)
    p["blur"] = u(0.0, 0.4) * dd
    p["noise"] = u(1.0, 3.5) * d
    # occluders: up to two per image
    for k in range(2):
        on = rng.random(n) < min(0.9, (0.08 if k == 0 else 0.02) * d)
        p[f"occ{k}_on"] = on
        p[f"occ{k}_kind"] = rng.random(n) < 0.5  # True: bar (arm/hand/hair strand), False: blob
        p[f"occ{k}_x"] = u(-20.0, 20.0)
        p[f"occ{k}_y"] = u(-14.0, 22.0)
        p[f"occ{k}_ang"] = u(0.0, np.pi)
        p[f"occ{k}_len"] = u(6.0, 16.0)
        p[f"occ{k}_rad"] = u(2.5, 5.5)
        p[f"occ{k}_val"] = u(20.0, 235.0)
    return p


# ---- rendering ---------------------------------------------------------------------------------


def _render_canonical(p: dict[str, np.ndarray], sl: slice) -> tuple[np.ndarray, np.ndarray]:
    """Premultiplied value and alpha, (B, CH, CW) float32, of the faces ``sl`` in the canonical frame."""
    e = p["expr"][sl]
    ex = {name: _col(e[:, i]) for name, i in _P.items()}
    c = {k: _col(v[sl]) for k, v in p.items() if v.ndim == 1}
    U = _U[None, None, :]
    V = _V[None, :, None]
    skin = c["skin"]

    # -- face oval (egg-shaped: narrower towards the chin) with soft 3D shading -------------------------
    inv_a = 1.0 / (c["face_a"] * (1.0 - c["chin"] * np.clip(V / c["face_b"], 0.0, 1.0) ** 2))  # (B, H, 1)
    r2 = (U * U) * (inv_a * inv_a)
    r2 += (V / c["face_b"]) ** 2
    ka = _R * c["face_a"]
    alpha = _lin_cov(np.sqrt(r2), ka, 0.5 + ka)  # signed distance ~ (r - 1) * a
    np.minimum(r2, 1.0, out=r2)
    r2 *= r2
    val = r2  # premultiplied value of the face layer
    val *= -c["shade"] * skin
    val += skin
    val *= alpha

    # -- eyes and brows (one window per side) ----------------------------------------------------------
    eye_open = np.clip(1.0 + ex["eye_open"], 0.2, 2.2)
    eh = 0.095 * eye_open
    sclera = np.minimum(skin * 1.18, 250.0)
    rs = _rows(-0.95, 0.15)
    Vw = _V[None, rs, None]
    for side in (-1.0, 1.0):
        cs = _cols(-0.01, 0.82) if side > 0 else _cols(-0.82, 0.01)
        Uw = _U[None, None, cs]
        vw = val[:, rs, cs]  # a view: the in-place updates below draw into val
        # brow: a tapered arched stroke from the inner to the outer end
        outer_x = side * 0.62
        y_mid = c["brow_y"] - 0.18 * ex["brow_raise"] - ex["brow_asym"] * 0.06 * side
        y_in = y_mid - 0.12 * ex["brow_inner"]
        y_out = y_mid + 0.03 * ex["brow_inner"]
        x_in = side * (0.12 - 0.025 * np.minimum(ex["brow_inner"], 0.0))  # a frown pulls the brows together
        t = np.clip((Uw - x_in) / (outer_x - x_in), 0.0, 1.0)  # (B, 1, W)
        px = x_in + t * (outer_x - x_in)
        py = y_in + t * (y_out - y_in) - 0.2 * t * (1.0 - t)
        dist = np.sqrt((Uw - px) ** 2 + (Vw - py) ** 2)
        dist -= c["brow_t"] * (1.25 - 0.6 * t)
        brow = _cov(dist)
        brow *= c["brow_dark"]
        # frown lines between the brows
        glab = _cov(np.maximum(np.abs(Uw - side * 0.055) - 0.012, np.abs(Vw - c["brow_y"] - 0.08) - 0.11))
        glab *= 0.30 * np.clip(-ex["brow_inner"], 0.0, 1.5)
        np.maximum(brow, glab, out=brow)
        # eye socket shadow: a soft dark ellipse around and above the eye
        du, dv = Uw - side * c["eye_x"], Vw - c["eye_y"]
        q = (du * du) * 10.0 + ((dv + 0.03) ** 2) * 40.0
        np.minimum(q, 1.0, out=q)
        q -= 1.0
        q *= q
        q *= -0.18
        q += 1.0
        q *= 1.0 - brow
        vw *= q
        # eye opening (sclera), iris clipped by it, dark upper lid line
        ro = np.sqrt((du / c["eye_w"]) ** 2 + (dv / eh) ** 2)
        ro -= 1.0
        opening = _lin_cov(ro, _R * eh, 0.5)
        iris = _cov(np.sqrt((du - c["gaze_u"]) ** 2 + (dv - c["gaze_v"]) ** 2) - 0.075)
        iris *= opening
        vw += opening * (sclera - vw)
        vw += iris * (skin * 0.22 - vw)
        lid = _lin_cov(np.abs(ro), _R * eh / 0.9, 1.0)
        lid *= dv < 0.0
        lid *= -0.55
        lid += 1.0
        vw *= lid

    # -- forehead wrinkles (raised brows) -----------------------------------------------------------------
    rs, cs = _rows(-1.1, -0.4), _cols(-0.55, 0.55)
    Uw, Vw = _U[None, None, cs], _V[None, rs, None]
    vw = val[:, rs, cs]
    raise_ = np.clip(ex["brow_raise"], 0.0, 1.5)
    fw = 0.22 * raise_ + 0.12 * np.clip(ex["brow_inner"], 0.0, 1.5)
    ext = 0.16 + 0.22 * np.minimum(raise_, 1.0)
    for k in range(2):
        y_k = c["brow_y"] - 0.18 * raise_ - 0.17 - 0.09 * k + 0.10 * Uw * Uw
        vw *= 1.0 - fw * _cov(np.maximum(np.abs(Vw - y_k) - 0.012, np.abs(Uw) - ext))

    # -- raised cheeks, nostrils, nasolabial folds, nose wrinkles ----------------------------------------
    rs, cs = _rows(-0.1, 0.85), _cols(-0.75, 0.75)
    Uw, Vw = _U[None, None, cs], _V[None, rs, None]
    vw = val[:, rs, cs]
    fold = 0.30 * np.clip(ex["fold"], 0.0, 1.5)
    t = np.clip((Vw - 0.22) / 0.45, 0.0, 1.0)  # (1, H, 1)
    fy = np.abs(Vw - (0.22 + 0.45 * t)) * 0.3
    widen = 1.0 + 0.15 * np.clip(ex["mouth_width"], -1.0, 1.0)
    cheek = 0.14 * np.clip(ex["cheek"], 0.0, 1.5)
    for side in (-1.0, 1.0):
        q = ((Uw - side * 0.50) * (1 / 0.22)) ** 2 + ((Vw - 0.30 + 0.05 * cheek) * (1 / 0.17)) ** 2
        np.minimum(q, 1.0, out=q)
        q -= 1.0
        q *= q
        vw *= 1.0 + cheek * q
        nost = np.sqrt(((Uw - side * 0.10) / 0.065) ** 2 + ((Vw - 0.30) / 0.035) ** 2)
        nost -= 1.0
        vw *= 1.0 - 0.40 * _lin_cov(nost, _R * 0.035, 0.5)
        fd = np.abs(Uw - side * (0.20 + 0.24 * t**0.8) * widen)
        fd += fy
        vw *= 1.0 - fold * _cov(fd - 0.018)
    wr = 0.28 * np.clip(ex["wrinkle"], 0.0, 1.5)
    for y0 in (-0.02, 0.06):
        vw *= 1.0 - wr * _cov(np.maximum(np.abs(Vw - y0) - 0.01, np.abs(Uw) - 0.10))

    # -- mouth: upper and lower lip curves around an opening (dark, or teeth) -----------------------------
    rs, cs = _rows(0.15, 1.05), _cols(-0.75, 0.75)
    Uw, Vw = _U[None, None, cs], _V[None, rs, None]
    vw = val[:, rs, cs]
    mw = c["mouth_w"] * np.clip(1.0 + 0.6 * ex["mouth_width"], 0.45, 1.7)
    xn = np.clip(Uw / mw, -1.0, 1.0)  # (B, 1, W)
    env = np.sqrt(1.0 - xn**2)
    curve = np.clip(ex["mouth_curve"], -1.6, 1.6)
    sneer = np.clip(ex["sneer"], 0.0, 1.6)
    side = c["sneer_side"]
    yc = c["mouth_y"] - curve * 0.22 * (xn**2 - 0.35) - sneer * 0.05 * side * xn
    opening = np.clip(ex["mouth_open"], 0.0, 1.6) * 0.18
    lift = sneer * 0.11 * np.clip(side * xn + 0.3, 0.0, 1.3) * env  # one-sided raised upper lip
    upper = yc - opening * 0.8 * env - lift
    lower = yc + opening * 1.1 * env
    lt = 0.05 * np.clip(1.0 - 0.5 * ex["lip_thin"], 0.4, 1.4)
    ends = np.abs(Uw) - mw
    outer = _cov(np.maximum(np.maximum(upper - lt - Vw, Vw - lower - lt), ends - 0.3 * lt))
    inner = _cov(np.maximum(np.maximum(upper - Vw, Vw - lower), ends + 0.3 * lt))
    teeth = c["teeth"] * _cov(Vw - (upper + 0.45 * (lower - upper)))
    in_val = skin * 0.12 + teeth * (np.minimum(skin * 1.2, 245.0) - skin * 0.12)
    vw += outer * (skin * 0.45 - vw)
    vw += inner * (in_val - vw)

    # -- neck (behind the face, in shadow) ------------------------------------------------------------------
    rs = _rows(0.45, 9.0)
    neck = _cov(np.maximum(np.abs(U) - 0.45 * c["face_a"], 0.55 - V[:, rs]))
    neck *= 1.0 - alpha[:, rs]
    val[:, rs] += neck * (skin * 0.78)
    alpha[:, rs] += neck

    # -- hair: a cap over the head above the hairline (thin for short hair); long hair also falls --------
    # behind the face down to the jaw. Soft vertical strands.
    ht = p["hair_type"][sl]
    tone = c["hair_tone"] * (1.0 + 0.05 * np.sin(U * c["strand_f"] + c["hairline"] * 40.0))  # (B, 1, W)
    rs = _rows(-9.0, -0.25)
    Vr = V[:, rs]
    head = np.sqrt((U / (c["face_a"] * 1.10)) ** 2 + ((Vr + 0.10) / (c["face_b"] * 1.06)) ** 2)
    hair = _lin_cov(head, ka, 0.5 + ka)
    hair *= _cov(Vr - (c["hairline"] - 0.10 * (U / c["face_a"]) ** 2))
    hair *= _col(np.where(ht == 0, 0.35, 1.0))
    val[:, rs] += hair * (tone - val[:, rs])
    alpha[:, rs] += hair * (1.0 - alpha[:, rs])
    li = np.flatnonzero(ht == 2)
    if len(li):
        rs = _rows(-9.0, 1.15)
        back = np.sqrt((U / (c["face_a"][li] * 1.24)) ** 2 + ((V[:, rs] - 0.05) / (c["face_b"][li] * 0.98)) ** 2)
        back = _lin_cov(back, _R, 0.5 + _R)
        back *= 1.0 - alpha[li, rs]
        val[li, rs] += back * tone[li]
        alpha[li, rs] += back
    return val, alpha


_BG_INTERP = cv2.resize(np.eye(4, dtype=np.float32), (4, IMG), interpolation=cv2.INTER_LINEAR)  # (48, 4)
_TEX = 16
_TEX_INTERP = cv2.resize(np.eye(_TEX, dtype=np.float32), (_TEX, IMG), interpolation=cv2.INTER_LINEAR)  # (48, 16)
_XY = (np.arange(IMG, dtype=np.float32) - (IMG - 1) / 2) / (IMG / 2)  # pixel centres in [-1, 1]
_GAUSS: np.ndarray | None = None


def _gauss_lut() -> np.ndarray:
    """Normal quantiles at 65536 equispaced levels: Gaussian noise from uint16 draws, ~4x faster."""
    global _GAUSS
    if _GAUSS is None:
        nd = NormalDist()
        _GAUSS = np.array([nd.inv_cdf((k + 0.5) / 65536) for k in range(65536)], dtype=np.float32)
    return _GAUSS


def _render_batch(p: dict[str, np.ndarray], sl: slice, noise_rng: np.random.Generator) -> np.ndarray:
    """The finished uint8 images of the samples ``sl``."""
    pv, pa = _render_canonical(p, sl)
    b = pv.shape[0]
    # pose: warp the canonical face (premultiplied value and alpha together) into the image
    s = p["scale"][sl] / _R
    th = np.deg2rad(p["rot"][sl])
    cs, sn = s * np.cos(th), s * np.sin(th)
    cu0, cv0 = (_CW - 1) / 2, -_V0 * _R  # canonical pixel of the face centre (u, v) = (0, 0)
    tx = (IMG - 1) / 2 + p["dx"][sl]
    ty = (IMG - 1) / 2 - 0.5 + p["dy"][sl]
    mats = np.stack([cs, -sn, tx - cs * cu0 + sn * cv0, sn, cs, ty - sn * cu0 - cs * cv0], axis=1).reshape(b, 2, 3)
    src = np.stack([pv, pa], axis=-1)
    warped = np.empty((b, IMG, IMG, 2), dtype=np.float32)
    for i in range(b):
        cv2.warpAffine(src[i], mats[i], (IMG, IMG), dst=warped[i], flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    # background: flat level + low-frequency texture, behind the face
    img = _BG_INTERP @ p["bg_tex"][sl].astype(np.float32) @ _BG_INTERP.T
    img += _col(p["bg"][sl])
    img *= 1.0 - warped[..., 1]
    img += warped[..., 0]
    tex = noise_rng.standard_normal((b, _TEX, _TEX), dtype=np.float32) * _col(p["tex"][sl])
    img += _TEX_INTERP @ tex @ _TEX_INTERP.T
    X, Y = _XY[None, None, :], _XY[None, :, None]
    # occluders (image frame, pixel units): a bar (arm, hand, hair strand) or a blob
    xs, ys = X * (IMG / 2), Y * (IMG / 2)
    for k in range(2):
        idx = np.flatnonzero(p[f"occ{k}_on"][sl])
        if not len(idx):
            continue
        g = {n: _col(p[f"occ{k}_{n}"][sl][idx]) for n in ("x", "y", "ang", "len", "rad", "val", "kind")}
        ca, sa = np.cos(g["ang"]), np.sin(g["ang"])
        lu = (xs - g["x"]) * ca + (ys - g["y"]) * sa
        lv = (ys - g["y"]) * ca - (xs - g["x"]) * sa
        cap_d = np.sqrt(np.maximum(np.abs(lu) - g["len"], 0.0) ** 2 + lv**2) - g["rad"]
        ea, eb = g["len"] * 0.5 + g["rad"], g["rad"] * 1.3
        blob_d = (np.sqrt((lu / ea) ** 2 + (lv / eb) ** 2) - 1.0) * eb
        cov = np.clip(0.5 - np.where(g["kind"] > 0.5, cap_d, blob_d), 0.0, 1.0)
        shade = g["val"] * (1.0 + 0.08 * np.sin(lu * 0.7))
        img[idx] += cov * (shade - img[idx])
    # lighting gradient, contrast, brightness
    img *= 1.0 + _col(p["grad_x"][sl]) * X + _col(p["grad_y"][sl]) * Y
    img -= 128.0
    img *= _col(p["contrast"][sl])
    img += _col(128.0 + p["bright"][sl])
    # blur (each image its own Gaussian sigma) and sensor noise
    blur = p["blur"][sl]
    for i in np.flatnonzero(blur > 0.3):
        cv2.GaussianBlur(img[i], (5, 5), float(blur[i]), dst=img[i], borderType=cv2.BORDER_REFLECT)
    noise = _gauss_lut()[noise_rng.integers(0, 65536, img.shape, dtype=np.uint16)]
    noise *= _col(p["noise"][sl])
    img += noise
    np.rint(img, out=img)
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


_BATCH = 128  # small batches keep the working arrays in cache (faster than large ones)


def synthetic_fingerprint(n_train: int, n_val: int, n_test: int, seed: int, difficulty: float) -> str:
    """Short hash of the generator version and all arguments."""
    key = json.dumps(
        {"version": SYNTHETIC_VERSION, "n_train": int(n_train), "n_val": int(n_val), "n_test": int(n_test),
         "seed": int(seed), "difficulty": float(difficulty)},
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def make_synthetic(
    n_train: int = 7000, n_val: int = 1400, n_test: int = 1400, *, seed: int = 0, difficulty: float = 1.0
) -> FerData:
    """Generate the synthetic FER dataset (see the module docstring: for running, not for results).

    Rows are ordered train, then val, then test; within each split classes are shuffled and the
    per-class counts follow ``CLASS_WEIGHTS`` (every class present whenever a split has >= 7 rows).
    Same arguments -> bitwise identical output; a different seed gives different faces.
    """
    sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if min(sizes.values()) < 0:
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    if not np.isfinite(difficulty) or difficulty < 0:
        raise ValueError(f"difficulty must be a finite number >= 0, got {difficulty}")
    ss = np.random.SeedSequence([SYNTHETIC_VERSION, int(seed)])
    label_rng, param_rng, noise_rng = (np.random.Generator(np.random.PCG64(s)) for s in ss.spawn(3))
    labels_parts, split_parts = [], []
    for name, n in sizes.items():
        counts = _split_counts(n, CLASS_WEIGHTS)
        lab = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int64), counts)
        labels_parts.append(label_rng.permutation(lab))
        split_parts.append(np.full(n, name, dtype=object))
    labels = np.concatenate(labels_parts).astype(np.int64)
    split = np.concatenate(split_parts).astype(f"<U{max(map(len, SPLITS))}")
    n = len(labels)
    p = _draw_params(param_rng, labels, float(difficulty))
    images = np.empty((n, IMG, IMG), dtype=np.uint8)
    for start in range(0, n, _BATCH):
        sl = slice(start, min(n, start + _BATCH))
        images[sl] = _render_batch(p, sl, noise_rng)
    fp = synthetic_fingerprint(n_train, n_val, n_test, seed, difficulty)
    return FerData(
        images=images,
        labels=labels,
        split=split,
        ids=np.arange(n, dtype=np.int64),
        source=f"synthetic:seed={int(seed)}" + ("" if difficulty == 1.0 else f",difficulty={float(difficulty):g}"),
        layout="synthetic",
        fingerprint=fp,
        notes=[f"synthetic faces v{SYNTHETIC_VERSION}: for running and CI only, not a substitute for real data"],
    )
