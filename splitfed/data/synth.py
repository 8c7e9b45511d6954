"""A procedural, seeded eye-region data set: the zero-setup demo and test data.

SYNTHETIC. These are drawings, not faces; results on them say nothing about real people. They
exist so that every algorithm can be run, tested and compared without downloading anything.

Each picture is the band from the forehead to just below the eyes, with the lower face absent
or masked. Emotions are drawn as the upper-face action units associated with them (FACS):

    happy      AU6 cheek raiser: lower lids pushed up, crow's feet
    sad        AU1 inner brow raiser + AU4 brow lowerer (oblique brows), drooping lids
    surprised  AU1 + AU2 (whole brow raised, arched) + AU5 upper lid raiser (eyes wide)
    afraid     AU1 + AU2 + AU4 (raised but drawn together) + AU5 + AU7
    angry      AU4 (brows down and together, glabella lines) + AU5 + AU7 (glare)
    disgusted  AU9 nose wrinkler (lines at the nasal root) + AU4 + AU6/AU7
    neutral    none

Intensity varies per picture and people differ in their resting brows and lids, so weak
expressions overlap with neutral and with each other; fear/surprise, anger/disgust and
sad/neutral stay confusable, as they are on real faces. Identity (eye shape and spacing, brows,
skin, hair, glasses), pose, lighting and noise vary more than a subtle expression does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from splitfed.data.dataset import EmotionDataset
from splitfed.emotions import EMOTIONS

AUS = ("au1", "au2", "au4", "au5", "au6", "au7", "au9", "droop")

# Prototype action-unit intensities per emotion, in the order of EMOTIONS.
PROTOTYPES: dict[str, dict[str, float]] = {
    "afraid": {"au1": 1.0, "au2": 0.6, "au4": 0.6, "au5": 0.9, "au7": 0.4},
    "angry": {"au4": 1.0, "au5": 0.4, "au7": 0.7},
    "disgusted": {"au4": 0.6, "au9": 1.0, "au6": 0.5, "au7": 0.4},
    "happy": {"au6": 1.0},
    "neutral": {},
    "sad": {"au1": 0.9, "au4": 0.5, "droop": 0.7},
    "surprised": {"au1": 1.0, "au2": 1.0, "au5": 1.0},
}


class SynthConfig(BaseModel):
    """Size and difficulty of the synthetic set."""

    model_config = ConfigDict(extra="forbid")

    identities: int = Field(80, ge=2, description="number of synthetic people")
    per_emotion: int = Field(6, ge=1, description="pictures of each person per emotion")
    height: int = Field(48, ge=16, description="crop height in pixels")
    width: int = Field(96, ge=32, description="crop width in pixels")
    seed: int = Field(0, description="generator seed; same seed, same pictures")
    intensity: tuple[float, float] = Field((0.4, 1.0), description="range of expression intensity")
    au_noise: float = Field(0.08, ge=0, description="per-picture jitter of each action unit")
    resting: float = Field(0.2, ge=0, description="how far people's resting faces differ")
    pixel_noise: float = Field(9.0, ge=0, description="sensor noise (grey levels, std)")


@dataclass
class Identity:
    skin: float
    eye_dx: float  # half the distance between eye centres, fraction of width
    eye_y: float  # eye line, fraction of height
    eye_w: float  # eye half-width, fraction of width
    eye_open: float  # upper-lid height relative to eye half-width
    iris: float  # iris radius relative to eye half-width
    iris_tone: float
    brow_gap: float  # brow height above the eye line, fraction of height
    brow_thick: float
    brow_len: float
    brow_arch: float
    brow_tone: float
    hair: float  # fringe reaching down this fraction of the height (0 = none)
    glasses: bool
    rest: dict[str, float]
    texture_seed: int


def make_identity(rng: np.random.Generator, resting: float) -> Identity:
    rest = {au: float(max(0.0, rng.normal(0, resting * 0.5))) for au in AUS}
    rest["au4"] = float(rng.normal(0, resting * 0.7))  # some people frown at rest, some lift
    return Identity(
        skin=float(rng.uniform(70, 205)),
        eye_dx=float(rng.uniform(0.19, 0.26)),
        eye_y=float(rng.uniform(0.58, 0.70)),
        eye_w=float(rng.uniform(0.085, 0.115)),
        eye_open=float(rng.uniform(0.32, 0.52)),
        iris=float(rng.uniform(0.38, 0.52)),
        iris_tone=float(rng.uniform(20, 110)),
        brow_gap=float(rng.uniform(0.16, 0.27)),
        brow_thick=float(rng.uniform(0.035, 0.085)),
        brow_len=float(rng.uniform(0.85, 1.25)),
        brow_arch=float(rng.uniform(-0.01, 0.05)),
        brow_tone=float(rng.uniform(0.25, 0.75)),
        hair=float(rng.choice([0.0, 0.0, rng.uniform(0.05, 0.3)])),
        glasses=bool(rng.random() < 0.2),
        rest=rest,
        texture_seed=int(rng.integers(2**31)),
    )


def emotion_aus(
    emotion: str, intensity: float, ident: Identity, rng: np.random.Generator, noise: float
) -> dict[str, float]:
    proto = PROTOTYPES[emotion]
    return {
        au: float(
            np.clip(
                intensity * proto.get(au, 0.0) + ident.rest[au] + rng.normal(0, noise), -0.4, 1.4
            )
        )
        for au in AUS
    }


def _curve(
    p0: tuple[float, float], p1: tuple[float, float], bulge: float, n: int = 24
) -> np.ndarray:
    """Quadratic curve from p0 to p1 whose middle is pushed up by `bulge` (negative = down)."""
    t = np.linspace(0, 1, n)[:, None]
    a, b = np.array(p0), np.array(p1)
    mid = (a + b) / 2 + np.array([0.0, -bulge])
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * mid + t**2 * b


def render(
    ident: Identity,
    aus: dict[str, float],
    rng: np.random.Generator,
    h: int = 48,
    w: int = 96,
    pixel_noise: float = 9.0,
) -> np.ndarray:
    """Draw one eye-region picture (uint8, h x w) of `ident` showing action units `aus`."""
    s = 4  # draw at 4x and downsample, for smooth lines
    H, W = h * s, w * s
    tex = np.random.default_rng(ident.texture_seed)
    img = np.full((H, W), ident.skin, np.float32)
    # Skin texture: fixed per person (pores, blemishes), low contrast.
    img += cv2.resize(
        tex.normal(0, 6, (h // 4, w // 4)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC
    )
    a = {k: max(v, 0.0) for k, v in aus.items()}
    a4 = aus["au4"]
    dark = ident.skin * 0.35
    line = max(1, s // 2)

    # Forehead wrinkles when the brows are raised.
    lift = a["au1"] * 0.6 + a["au2"] * 0.4
    if lift > 0.15:
        for k in range(3):
            y = H * (0.12 + 0.09 * k)
            pts = _curve((W * 0.28, y), (W * 0.72, y), H * 0.02 * (1 + k * 0.2))
            cv2.polylines(
                img, [np.int32(pts)], False, ident.skin - 22 * min(lift, 1.2), line, cv2.LINE_AA
            )

    # Glabella (vertical frown lines) with AU4; nasal-root wrinkles with AU9.
    if a4 > 0.2:
        for side in (-1, 1):
            x = W * (0.5 + side * 0.03)
            cv2.line(
                img,
                (int(x), int(H * 0.30)),
                (int(x + side * W * 0.005), int(H * 0.55)),
                ident.skin - 40 * min(a4, 1.2),
                line + 1,
                cv2.LINE_AA,
            )
    if a["au9"] > 0.15:
        for k in range(3):
            y = H * (0.70 + 0.08 * k)
            cv2.line(
                img,
                (int(W * 0.45), int(y)),
                (int(W * 0.55), int(y - H * 0.01)),
                ident.skin - 45 * min(a["au9"], 1.2),
                line + 1,
                cv2.LINE_AA,
            )

    for side in (-1, 1):  # -1: the eye on the left of the picture
        cx = W * (0.5 + side * ident.eye_dx)
        cy = H * ident.eye_y
        ew = W * ident.eye_w
        inner_x, outer_x = cx - side * ew, cx + side * ew
        # Lids: AU5 opens, AU7 and droop close from above, AU6 pushes the lower lid up.
        up = (
            ew
            * ident.eye_open
            * (1 + 0.55 * aus["au5"] - 0.35 * a["au7"] - 0.35 * a["droop"] - 0.2 * a["au6"])
        )
        low = ew * 0.32 * (1 - 0.55 * a["au6"] - 0.3 * a["au7"] - 0.2 * a["au9"] + 0.25 * a["au5"])
        up, low = max(up, ew * 0.08), max(low, ew * 0.04)
        upper = _curve((inner_x, cy), (outer_x, cy - 0.06 * ew), up * 2)
        lower = _curve((outer_x, cy - 0.06 * ew), (inner_x, cy), -low * 2)
        outline = np.int32(np.vstack([upper, lower]))
        mask = np.zeros_like(img)
        cv2.fillPoly(mask, [outline], 1.0, cv2.LINE_AA)
        eye = np.full_like(img, 225.0)
        gaze = rng.normal(0, 0.15) * ew
        cv2.circle(
            eye,
            (int(cx + gaze), int(cy - up * 0.2)),
            int(ew * ident.iris),
            ident.iris_tone,
            -1,
            cv2.LINE_AA,
        )
        cv2.circle(
            eye,
            (int(cx + gaze), int(cy - up * 0.2)),
            int(ew * ident.iris * 0.45),
            10,
            -1,
            cv2.LINE_AA,
        )
        img = img * (1 - mask) + eye * mask
        cv2.polylines(img, [np.int32(upper)], False, dark, line + 2, cv2.LINE_AA)
        cv2.polylines(img, [np.int32(lower)], False, ident.skin * 0.7, line, cv2.LINE_AA)
        # Lid crease, hidden when the upper lid is raised wide.
        crease = _curve((inner_x, cy - up * 0.6), (outer_x, cy - up * 0.7), up * 1.6 + ew * 0.15)
        cv2.polylines(
            img, [np.int32(crease)], False, ident.skin * (0.8 + 0.12 * a["au5"]), line, cv2.LINE_AA
        )
        # Crow's feet with AU6.
        if a["au6"] > 0.15:
            for k in (-1, 0, 1):
                x0 = outer_x + side * ew * 0.25
                cv2.line(
                    img,
                    (int(x0), int(cy + k * ew * 0.15)),
                    (int(x0 + side * ew * 0.45), int(cy + k * ew * 0.35)),
                    ident.skin - 40 * min(a["au6"], 1.2),
                    line,
                    cv2.LINE_AA,
                )
        # Cheek bulge under the eye with AU6/AU9.
        if a["au6"] + a["au9"] > 0.2:
            cheek = _curve((inner_x, cy + low * 2.4), (outer_x, cy + low * 2.4), -ew * 0.2)
            cv2.polylines(
                img,
                [np.int32(cheek)],
                False,
                ident.skin - 30 * min(a["au6"] + a["au9"], 1.2),
                line,
                cv2.LINE_AA,
            )
        # Brows: AU1 lifts the inner end, AU2 the outer end, AU4 lowers and pulls them together.
        by = cy - H * ident.brow_gap
        inner_b = (
            cx - side * ew * 0.95 * ident.brow_len + side * W * 0.035 * max(a4, 0),
            by - H * 0.16 * aus["au1"] + H * 0.09 * a4 - H * 0.03 * a["au9"],
        )
        outer_b = (
            cx + side * ew * 1.25 * ident.brow_len,
            by + H * 0.05 - H * 0.13 * aus["au2"] + H * 0.04 * max(a4, 0),
        )
        arch = H * (
            ident.brow_arch + 0.05 * a["au2"] - 0.03 * max(a4, 0) + 0.02 * a["au1"] * a["au4"] * 0
        )
        brow = _curve(inner_b, outer_b, arch)
        thick = max(2, int(H * ident.brow_thick))
        cv2.polylines(
            img, [np.int32(brow)], False, ident.skin * ident.brow_tone, thick, cv2.LINE_AA
        )
        if ident.glasses:
            cv2.ellipse(
                img,
                (int(cx), int(cy)),
                (int(ew * 1.6), int(ew * 1.1)),
                0,
                0,
                360,
                30,
                line + 1,
                cv2.LINE_AA,
            )

    if ident.glasses:
        cv2.line(
            img,
            (int(W * (0.5 - ident.eye_dx) + W * ident.eye_w * 1.6), int(H * ident.eye_y)),
            (int(W * (0.5 + ident.eye_dx) - W * ident.eye_w * 1.6), int(H * ident.eye_y)),
            30,
            line + 1,
        )
    if ident.hair > 0:
        edge = _curve((0, H * ident.hair * 1.3), (W, H * ident.hair * 0.7), H * 0.05)
        poly = np.int32(np.vstack([[[0, 0]], edge, [[W, 0]]]))
        cv2.fillPoly(img, [poly], 25 + ident.skin * 0.1, cv2.LINE_AA)
    # The lower face is masked (mask, niqab, litham) in a share of the pictures.
    if rng.random() < 0.4:
        top = H * rng.uniform(0.9, 0.98)
        cv2.fillPoly(
            img,
            [np.int32([[0, H], [0, top], [W // 2, top - H * 0.04], [W, top], [W, H]])],
            float(rng.uniform(10, 240)),
        )

    # Pose: small roll, scale and shift (the detector's levelling is imperfect).
    m = cv2.getRotationMatrix2D(
        (W / 2 + rng.normal(0, W * 0.02), H / 2 + rng.normal(0, H * 0.03)),
        rng.normal(0, 4.0),
        rng.uniform(0.93, 1.07),
    )
    img = cv2.warpAffine(img, m, (W, H), borderMode=cv2.BORDER_REFLECT)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    # Lighting: a gradient from a random side, global gain and gamma; then blur and noise.
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = ((xx / w - 0.5) * np.cos(ang) + (yy / h - 0.5) * np.sin(ang)) * rng.uniform(0, 70)
    img = img * rng.uniform(0.75, 1.2) + grad
    sigma = rng.uniform(0.0, 0.9)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = img + rng.normal(0, pixel_noise, img.shape)
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(0.8, 1.25)
    return np.clip(img, 0, 255).astype(np.uint8)


# A rendered set is kept for the next call of the process only up to this size (4 sets at most).
CACHE_BYTES = 32 * 2**20


def generate_synth(config: SynthConfig | None = None) -> EmotionDataset:
    """The whole synthetic set: identities x emotions x per_emotion pictures, with subject ids.

    A process renders each setting once (the default set takes seconds) while it is at most
    `CACHE_BYTES`; every call gets its own copy of the arrays, so a caller that changes them
    changes nobody else's."""
    cfg = config or SynthConfig()
    size = cfg.identities * len(EMOTIONS) * cfg.per_emotion * cfg.height * cfg.width
    if size > CACHE_BYTES:
        images, labels, subjects = _render_set(cfg)
    else:
        images, labels, subjects = (a.copy() for a in _cached(cfg.model_dump_json()))
    return EmotionDataset(
        name="synth",
        images=images,
        labels=labels,
        subjects=subjects,
        meta={"synthetic": True, "config": cfg.model_dump(mode="json")},
    )


@functools.lru_cache(maxsize=4)
def _cached(config_json: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _render_set(SynthConfig.model_validate_json(config_json))


def _render_set(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels, subjects = [], [], []
    for p in range(cfg.identities):
        rng = np.random.default_rng([cfg.seed, p])
        ident = make_identity(rng, cfg.resting)
        for e, emotion in enumerate(EMOTIONS):
            for _ in range(cfg.per_emotion):
                intensity = float(rng.uniform(*cfg.intensity))
                aus = emotion_aus(emotion, intensity, ident, rng, cfg.au_noise)
                images.append(render(ident, aus, rng, cfg.height, cfg.width, cfg.pixel_noise))
                labels.append(e)
                subjects.append(f"S{p:03d}")
    return np.stack(images)[:, None], np.asarray(labels, dtype=np.int64), np.asarray(subjects)
