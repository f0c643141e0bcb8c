"""Face detection (BlazeFace, a TF.js graph model) and alignment before the embedding model.

Knows nothing of Redis. BlazeFace (short range, front camera): 128x128 RGB input scaled to [-1, 1], 896
anchors (16x16 grid at stride 8 with 2 anchors a cell, then 8x8 at stride 16 with 6), a box and six
keypoints per anchor (subject's right eye = image-left, left eye, nose tip, mouth centre, right ear, left
ear), logits for scores, weighted non-max suppression (shared/models/README.md).

The detector wants the face to fill a good part of its square frame, so a photo is searched whole (padded
to a square, with a zero border) and, when it is large, also in overlapping square tiles; detections from
all views are merged by weighted NMS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from producer.contract.defaults import DEFAULT_DETECT_BATCH_SIZES
from worker.inference.tfjs_graph import TfjsGraphModel

SIZE = 128
# insightface's 112x112 ArcFace template (eyes, nose, mouth corners); BlazeFace gives the mouth centre,
# so the two corners are averaged.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [(41.5493 + 70.7299) / 2, (92.3655 + 92.2041) / 2]],
    np.float64,
)


@dataclass
class Face:
    """A detected face in the original image's pixel coordinates."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    keypoints: np.ndarray  # 6 x 2: right eye (image-left), left eye, nose, mouth, right ear, left ear
    score: float
    image_size: tuple[int, int] | None = None  # (width, height) of the image it was found in

    @property
    def size(self) -> float:
        """The box's shorter side, in pixels."""
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def visible_size(self) -> float:
        """The shorter side of the part of the box inside the image (the box itself when the image size is
        unknown): a face cut by the photo's border counts for what is left of it."""
        if self.image_size is None:
            return self.size
        x1, y1, x2, y2 = self.box
        w, h = self.image_size
        return max(0.0, min(min(x2, w) - max(x1, 0.0), min(y2, h) - max(y1, 0.0)))

    def as_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "keypoints": np.round(self.keypoints, 2).tolist(),
            "score": round(self.score, 4),
        }


def _anchors() -> np.ndarray:
    out = []
    for grid, stride, per_cell in ((16, 8, 2), (8, 16, 6)):
        for y in range(grid):
            for x in range(grid):
                out += [(stride * (x + 0.5), stride * (y + 0.5))] * per_cell
    return np.asarray(out, np.float32)  # 896 x 2, in 128-px units


ANCHORS = _anchors()


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou: float = 0.3) -> list[Face]:
    """MediaPipe's weighted NMS: overlapping detections are averaged, weighted by score."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    faces: list[Face] = []
    taken = np.zeros(len(scores), bool)
    for i in range(len(scores)):
        if taken[i]:
            continue
        group = (~taken) & (_iou(boxes[i], boxes) >= iou)
        group[i] = True
        taken |= group
        w = scores[group][:, None]
        faces.append(
            Face(
                tuple((boxes[group] * w).sum(0) / w.sum()),
                (keypoints[group] * w[:, :, None]).sum(0) / w.sum(),
                float(scores[i]),
            )
        )
    return faces


@dataclass(frozen=True)
class View:
    """A square region of an image (origin and side in image pixels) fed to the detector at 128x128."""

    x0: float
    y0: float
    side: float


def views_of(width: int, height: int, border: float = 0.15, tile: int = 384, stride: int = 192) -> list[View]:
    """The whole image padded to a square with a border of ``border`` x side, plus overlapping tiles when
    the image is much larger than ``tile``."""
    side = max(width, height) * (1 + 2 * border)
    views = [View((width - side) / 2, (height - side) / 2, side)]
    if max(width, height) > 1.5 * tile:
        for y in range(0, max(1, height - tile) + stride, stride):
            for x in range(0, max(1, width - tile) + stride, stride):
                views.append(View(min(x, max(0, width - tile)), min(y, max(0, height - tile)), tile))
    return list(dict.fromkeys(views))


def render(image: np.ndarray, view: View) -> np.ndarray:
    """The 128x128 detector input for a view (zero outside the image), x / 127.5 - 1."""
    scale = SIZE / view.side
    pil = Image.fromarray(image)
    out = pil.transform(
        (SIZE, SIZE),
        Image.Transform.AFFINE,
        (1 / scale, 0, view.x0, 0, 1 / scale, view.y0),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    return np.asarray(out, np.float32) / 127.5 - 1.0


class BlazeFace:
    """Batched BlazeFace on fixed batch shapes, with anchor decoding and NMS."""

    def __init__(
        self,
        model_json: str | Path,
        allowed_batch_sizes: Sequence[int] = DEFAULT_DETECT_BATCH_SIZES,
        min_score: float = 0.5,
        iou: float = 0.3,
    ) -> None:
        self.model = TfjsGraphModel(model_json)
        self.allowed = tuple(sorted(allowed_batch_sizes))
        self.min_score = min_score
        self.iou = iou
        outs = self.model.outputs
        # outputs by shape: [N, 512, 1] / [N, 512, 16] / [N, 384, 1] / [N, 384, 16]
        shapes = {k: tuple(v.shape[1:]) for k, v in self.model(np.zeros((1, SIZE, SIZE, 3), np.float32)).items()}
        self._s512 = next(k for k in outs if shapes[k] == (512, 1))
        self._r512 = next(k for k in outs if shapes[k] == (512, 16))
        self._s384 = next(k for k in outs if shapes[k] == (384, 1))
        self._r384 = next(k for k in outs if shapes[k] == (384, 16))

    def warm_up(self) -> None:
        for size in self.allowed:
            self.model(np.zeros((size, SIZE, SIZE, 3), np.float32))

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, regs = [], []
        top = self.allowed[-1]
        for start in range(0, len(batch), top):
            chunk = batch[start : start + top]
            size = next(s for s in self.allowed if s >= len(chunk))
            padded = (
                np.concatenate([chunk, np.zeros((size - len(chunk), SIZE, SIZE, 3), np.float32)])
                if size > len(chunk)
                else chunk
            )
            out = self.model(padded)
            scores.append(np.concatenate([out[self._s512][:, :, 0], out[self._s384][:, :, 0]], 1)[: len(chunk)])
            regs.append(np.concatenate([out[self._r512], out[self._r384]], 1)[: len(chunk)])
        return np.concatenate(scores), np.concatenate(regs)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """All faces of each RGB uint8 image (image pixel coordinates), most confident first."""
        jobs = [(i, v) for i, im in enumerate(images) for v in views_of(im.shape[1], im.shape[0])]
        if not jobs:
            return []
        logits, regs = self._run(np.stack([render(images[i], v) for i, v in jobs]))
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -80, 80)))
        per_image: list[tuple[list, list, list]] = [([], [], []) for _ in images]
        for (i, view), s, r in zip(jobs, scores, regs, strict=True):
            keep = s >= self.min_score
            if not keep.any():
                continue
            r, s, a = r[keep], s[keep], ANCHORS[keep]
            cx, cy = r[:, 0] + a[:, 0], r[:, 1] + a[:, 1]
            boxes = np.stack([cx - r[:, 2] / 2, cy - r[:, 3] / 2, cx + r[:, 2] / 2, cy + r[:, 3] / 2], 1)
            kps = r[:, 4:16].reshape(-1, 6, 2) + a[:, None, :]
            scale = view.side / SIZE
            per_image[i][0].append(boxes * scale + [view.x0, view.y0, view.x0, view.y0])
            per_image[i][1].append(kps * scale + [view.x0, view.y0])
            per_image[i][2].append(s)
        result: list = []
        for image, (bx, kp, sc) in zip(images, per_image, strict=True):
            faces: list[Face] = (
                weighted_nms(np.concatenate(bx), np.concatenate(kp), np.concatenate(sc), self.iou) if bx else []
            )
            for face in faces:
                face.image_size = (int(image.shape[1]), int(image.shape[0]))
            result.append(faces)
        return result


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform (rotation, uniform scale, translation) mapping ``src`` onto ``dst`` in
    the least-squares sense (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def align(image: np.ndarray, face: Face, size: int = 112) -> np.ndarray:
    """Warp the face onto the ArcFace template (eyes, nose, mouth) at ``size`` x ``size``; RGB uint8."""
    m = umeyama(face.keypoints[:4].astype(np.float64), ARCFACE_TEMPLATE * (size / 112.0))
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]  # PIL maps output pixels back to input pixels
    out = Image.fromarray(image).transform(
        (size, size),
        Image.Transform.AFFINE,
        tuple(inv.ravel()),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    return np.asarray(out)


def square_crop(image: np.ndarray, face: Face, margin: float = 0.2) -> np.ndarray:
    """A square crop around the face box, ``margin`` x side added on each side (zero outside the image)."""
    x1, y1, x2, y2 = face.box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    box = (int(round(cx - side / 2)), int(round(cy - side / 2)), int(round(cx + side / 2)), int(round(cy + side / 2)))
    return np.asarray(Image.fromarray(image).crop(box))


# Face selection. BlazeFace scores real, reasonably frontal faces 0.75-0.98 (all 40 crops 0.81-0.94; the 22 whole
# faces of the labelled group photos 0.78-0.98) and its false positives on texture, hair or torsos mostly 0.3-0.55
# (0.53 on a torso in bbt5.jpg; 0.50 on window frames in a user's photo). `auto` keeps the faces within
# AUTO_SCORE_MARGIN of the best score, which drops such a false positive beside any clear face, and among them takes
# the largest visible one: the main subject, not a neighbour cut by the border.
SELECT_POLICIES = ("auto", "largest", "confident")
AUTO_SCORE_MARGIN = 0.25


def pick(
    faces: Sequence[Face], policy: str = "auto", min_size: float = 0.0, margin: float = AUTO_SCORE_MARGIN
) -> Face | None:
    """The face a job is about, among faces of at least ``min_size`` pixels; None when there is none.

    ``auto``: of the faces scoring at least (best score - ``margin``), the one with the largest visible size
    (the part of its box inside the image). ``largest``: the largest box. ``confident``: the highest score."""
    faces = [f for f in faces if f.size >= min_size]
    if not faces:
        return None
    if policy == "auto":
        floor = max(f.score for f in faces) - margin
        return max((f for f in faces if f.score >= floor), key=lambda f: (f.visible_size, f.score))
    if policy == "largest":
        return max(faces, key=lambda f: f.size)
    if policy == "confident":
        return max(faces, key=lambda f: f.score)
    raise ValueError(f"unknown face selection {policy!r}; choose one of {', '.join(SELECT_POLICIES)}")


def pick_all(faces: Sequence[Face], min_face: float = 0.0, max_faces: int = 20) -> list[Face]:
    """Every face of at least ``min_face`` pixels, largest first (ties: most confident first), at most
    ``max_faces`` of them."""
    if max_faces < 1:
        raise ValueError(f"max_faces must be at least 1, got {max_faces}")
    kept = [f for f in faces if f.size >= min_face]
    return sorted(kept, key=lambda f: (-f.size, -f.score))[:max_faces]


__all__ = [
    "ARCFACE_TEMPLATE",
    "AUTO_SCORE_MARGIN",
    "SELECT_POLICIES",
    "BlazeFace",
    "Face",
    "align",
    "pick",
    "pick_all",
    "square_crop",
    "umeyama",
    "weighted_nms",
]
