"""Domain-shift proxy: the test set as another camera and another face detector would give it.

Real photos from another data set score far below the in-domain test (about 40 % against 70 %):
their detector puts the eye band a little lower or higher, tighter or looser and less level, and
their cameras differ in noise, focus, compression, lighting and resolution. Real sets cannot be
shipped, so this module renders those differences on the in-domain test crops. Accuracy on the
result says how much a model leans on one camera's and one detector's look.

Every perturbation is a pure function `f(images, rng, strength) -> images` of uint8
(N, C, H, W) arrays, any size and channel count (so it applies to crops and to whole photos
alike); `strength` 0 changes nothing, 1 is what another data set typically differs by:

    band_lower   the band sits 15 % of its height lower on the face: the eyes move up
    band_higher  15 % higher: the eyes move down
    tighter      the band is 25 % smaller (zoomed in); looser: 25 % larger (zoomed out)
    roll         the band is 10 degrees off level, either way
    noise        sensor noise, 20 grey levels (std)
    blur         defocus, a Gaussian of 1.6 pixels (std)
    jpeg         JPEG at quality 15 (95 at strength 0)
    gamma        gamma 2 or 1/2, either way
    gradient     light from one side, 100 grey levels across the picture
    exposure     contrast halved, then 40 grey levels brighter or darker
    lowres       a quarter of the resolution, scaled back up

`other_camera` composes them as a different set would: one geometric error per crop, then each
photometric change with probability one half at a random share of `strength`. Its accuracy is the
headline `shift_accuracy`; the single perturbations say where a gap comes from.

Pixels that a geometric change brings in from outside the picture repeat its border, the way a
band reaching past a crop shows the nearest skin; on real photos the detector sees the
real surroundings instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from torch import nn

from splitfed.data.batches import to_tensor
from splitfed.data.dataset import EmotionDataset

Perturbation = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]

# Magnitudes at strength 1 (see the module docstring).
BAND_OFFSET = 0.15  # of the height
BAND_SCALE = 0.25  # relative size
ROLL_DEGREES = 10.0
NOISE_STD = 20.0
BLUR_SIGMA = 1.6
JPEG_QUALITY = (95, 15)  # at strength 0 and 1
GAMMA_LOG2 = 1.0
GRADIENT_RANGE = 100.0
EXPOSURE_CONTRAST = 0.5
EXPOSURE_OFFSET = 40.0
LOWRES_FACTOR = 4.0


def _check(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")


def _hwc(image: np.ndarray) -> np.ndarray:
    """One (C, H, W) image as OpenCV wants it: (H, W) or (H, W, C)."""
    return image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))


def _chw(image: np.ndarray, channels: int) -> np.ndarray:
    return image[None] if channels == 1 or image.ndim == 2 else image.transpose(2, 0, 1)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def warp(
    images: np.ndarray, dy: float = 0.0, zoom: float = 1.0, degrees: float = 0.0
) -> np.ndarray:
    """Move the content by `dy` of the height (positive: down), zoom it about the centre by
    `zoom` (above 1: a tighter band) and turn it by `degrees` (counter-clockwise)."""
    _check(images)
    n, c, h, w = images.shape
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), degrees, zoom)
    m[1, 2] += dy * h
    out = np.empty_like(images)
    for i in range(n):
        warped = cv2.warpAffine(
            _hwc(images[i]), m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        out[i] = _chw(warped, c)
    return out


def band_lower(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """The detector's band sits lower on the face, so the eyes land higher in the crop."""
    return warp(images, dy=-BAND_OFFSET * strength)


def band_higher(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """The band sits higher on the face: the eyes land lower, the forehead is cut."""
    return warp(images, dy=BAND_OFFSET * strength)


def tighter(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smaller band around the same centre, as from a detector with tight face boxes."""
    return warp(images, zoom=1.0 + BAND_SCALE * strength)


def looser(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A larger band around the same centre."""
    return warp(images, zoom=1.0 / (1.0 + BAND_SCALE * strength))


def roll(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A band that is not level, turned either way (the sign is drawn per picture)."""
    _check(images)
    out = np.empty_like(images)
    for i, sign in enumerate(rng.choice([-1.0, 1.0], size=len(images))):
        out[i] = warp(images[i : i + 1], degrees=sign * ROLL_DEGREES * strength)[0]
    return out


def noise(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Gaussian sensor noise, independent per pixel."""
    _check(images)
    return _to_uint8(images + rng.normal(0.0, NOISE_STD * strength, images.shape))


def blur(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Defocus or motion-free softness: a Gaussian blur."""
    _check(images)
    sigma = BLUR_SIGMA * strength
    if sigma <= 0:
        return images.copy()
    out = np.empty_like(images)
    for i in range(len(images)):
        out[i] = _chw(cv2.GaussianBlur(_hwc(images[i]), (0, 0), sigma), images.shape[1])
    return out


def jpeg(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """JPEG compression at a quality that falls with strength (block artefacts, lost detail)."""
    _check(images)
    hi, lo = JPEG_QUALITY
    quality = int(round(hi - (hi - lo) * min(max(strength, 0.0), 1.0)))
    out = np.empty_like(images)
    for i in range(len(images)):
        ok, buf = cv2.imencode(".jpg", _hwc(images[i]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        flag = cv2.IMREAD_GRAYSCALE if images.shape[1] == 1 else cv2.IMREAD_COLOR
        out[i] = _chw(cv2.imdecode(buf, flag), images.shape[1])
    return out


def gamma(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Another tone curve: gamma 2**(+-strength), the sign drawn per picture."""
    _check(images)
    g = 2.0 ** (rng.choice([-1.0, 1.0], size=(len(images), 1, 1, 1)) * GAMMA_LOG2 * strength)
    return _to_uint8(255.0 * (images / 255.0) ** g)


def gradient(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Light from one side: a linear ramp in a random direction per picture."""
    _check(images)
    n, _, h, w = images.shape
    ang = rng.uniform(0.0, 2.0 * math.pi, size=(n, 1, 1, 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cos, sin = np.cos(ang), np.sin(ang)
    ramp = (xx / max(w - 1, 1) - 0.5) * cos + (yy / max(h - 1, 1) - 0.5) * sin
    ramp /= np.abs(cos) + np.abs(sin)  # from -1/2 to 1/2 corner to corner, whatever the angle
    return _to_uint8(images + GRADIENT_RANGE * strength * ramp)


def exposure(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Flat light and another exposure: contrast reduced about mid-grey, then a brightness
    offset whose sign is drawn per picture."""
    _check(images)
    contrast = 1.0 - (1.0 - EXPOSURE_CONTRAST) * strength
    offset = rng.choice([-1.0, 1.0], size=(len(images), 1, 1, 1)) * EXPOSURE_OFFSET * strength
    return _to_uint8((images - 128.0) * contrast + 128.0 + offset)


def lowres(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A camera farther away or cheaper: fewer pixels, scaled back up to the input size."""
    _check(images)
    n, c, h, w = images.shape
    factor = 1.0 + (LOWRES_FACTOR - 1.0) * strength
    sw, sh = max(1, round(w / factor)), max(1, round(h / factor))
    out = np.empty_like(images)
    for i in range(n):
        small = cv2.resize(_hwc(images[i]), (sw, sh), interpolation=cv2.INTER_AREA)
        out[i] = _chw(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), c)
    return out


GEOMETRIC: dict[str, Perturbation] = {
    "band_lower": band_lower,
    "band_higher": band_higher,
    "tighter": tighter,
    "looser": looser,
    "roll": roll,
}
# In the order a camera applies them: the light, the lens, the sensor, the encoder.
PHOTOMETRIC: dict[str, Perturbation] = {
    "gamma": gamma,
    "gradient": gradient,
    "exposure": exposure,
    "blur": blur,
    "lowres": lowres,
    "noise": noise,
    "jpeg": jpeg,
}
PERTURBATIONS: dict[str, Perturbation] = {**GEOMETRIC, **PHOTOMETRIC}


def other_camera(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Everything at once, per picture: one band error (offset, scale, roll drawn uniformly up
    to their full size), then each photometric change with probability 1/2 at a random share
    of `strength`."""
    _check(images)
    out = np.empty_like(images)
    for i in range(len(images)):
        u = rng.uniform(-1.0, 1.0, size=3) * strength
        x = warp(
            images[i : i + 1],
            dy=BAND_OFFSET * u[0],
            zoom=(1.0 + BAND_SCALE) ** u[1],
            degrees=ROLL_DEGREES * u[2],
        )
        for fn in PHOTOMETRIC.values():
            if rng.random() < 0.5:
                x = fn(x, rng, strength * float(rng.uniform(0.3, 1.0)))
        out[i] = x[0]
    return out


def shift_set(
    images: np.ndarray, name: str = "other_camera", seed: int = 0, strength: float = 1.0
) -> np.ndarray:
    """`images` perturbed by `name` (a key of PERTURBATIONS, or "other_camera"), seeded."""
    fn = other_camera if name == "other_camera" else PERTURBATIONS[name]
    return fn(images, np.random.default_rng([seed, *name.encode()]), strength)


@dataclass(frozen=True)
class OtherCamera:
    """One `other_camera` rendering of a test set, with the draw it came from, so that several
    metrics can share it (it is the slow part) and each can check it is the set it asked for."""

    images: np.ndarray
    seed: int
    strength: float

    @classmethod
    def of(cls, images: np.ndarray, seed: int = 0, strength: float = 1.0) -> OtherCamera:
        return cls(shift_set(images, "other_camera", seed, strength), seed, strength)

    def check(self, test: EmotionDataset, seed: int, strength: float) -> np.ndarray:
        """The images, after checking they render `test` at this seed and strength: a mismatch
        would pair one proxy with another draw's per-perturbation accuracies."""
        drawn = (len(self.images), self.seed, self.strength)
        if drawn != (len(test), seed, strength):
            raise ValueError(
                f"the other_camera set holds {drawn[0]} crops drawn at seed {self.seed}, strength "
                f"{self.strength}; these metrics are for {len(test)} crops at seed {seed}, "
                f"strength {strength}"
            )
        return self.images


# ---- accuracy of a trained model on the proxy -------------------------------------------------


class SplitHalves(Protocol):
    """What `shift_metrics` needs of a trained algorithm: the global client and server halves."""

    client_net: nn.Module
    server_net: nn.Module


def split_halves(model: SplitHalves) -> tuple[nn.Module, nn.Module] | None:
    """The model's client and server halves; None for one without (vertical, clip models)."""
    client = getattr(model, "client_net", None)
    server = getattr(model, "server_net", None)
    if not isinstance(client, nn.Module) or not isinstance(server, nn.Module):
        return None
    return client, server


def _logits(
    client_net: nn.Module, server_net: nn.Module, images: np.ndarray, batch_size: int
) -> torch.Tensor:
    """(N, classes) logits of N >= 1 uint8 crops through both halves in eval mode, a batch at a
    time (the modes are restored)."""
    modes = client_net.training, server_net.training
    client_net.eval()
    server_net.eval()
    try:
        with torch.no_grad():
            return torch.cat([
                server_net(client_net(to_tensor(images[s : s + batch_size])))
                for s in range(0, len(images), batch_size)
            ])  # fmt: skip
    finally:
        client_net.train(modes[0])
        server_net.train(modes[1])


def predict_classes(
    client_net: nn.Module, server_net: nn.Module, images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Class indices for uint8 crops, through both halves in eval mode (modes are restored)."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.int64)
    return _logits(client_net, server_net, images, batch_size).argmax(1).numpy()


def predict_probabilities(
    client_net: nn.Module, server_net: nn.Module, images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Softmax over the classes for uint8 crops, as `predict_classes` computes them."""
    if len(images) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.softmax(_logits(client_net, server_net, images, batch_size), 1).numpy()


def shift_metrics(
    model: SplitHalves,
    test: EmotionDataset,
    seed: int = 0,
    strength: float = 1.0,
    shifted: OtherCamera | None = None,
) -> dict[str, Any]:
    """In-domain accuracy, accuracy on the domain-shift proxy and on each perturbation.

    Keys: `in_domain_accuracy`, `shift_accuracy` (the `other_camera` set, or `shifted`, which
    must have been drawn for `test` at this seed and strength), `shift_gap` (their difference) and
    `shift_by_perturbation` (accuracy per single perturbation at `strength`).
    Returns {} for a model without split halves (the vertical and clip algorithms).
    """
    halves = split_halves(model)
    if halves is None or len(test) == 0:
        return {}

    def acc(images: np.ndarray) -> float:
        return float(np.mean(predict_classes(*halves, images) == test.labels))

    camera = shifted or OtherCamera.of(test.images, seed, strength)
    on_shift = acc(camera.check(test, seed, strength))
    clean = acc(test.images)
    return {
        "in_domain_accuracy": clean,
        "shift_accuracy": on_shift,
        "shift_gap": clean - on_shift,
        "shift_strength": strength,
        "shift_by_perturbation": {
            name: acc(shift_set(test.images, name, seed, strength)) for name in PERTURBATIONS
        },
    }
