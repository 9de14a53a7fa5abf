"""A small synthetic multi-structure task in MSD layout, for 2D learning curves (``benchmarks/bench_convergence``).

Each case is a stack of independent CT-like 2D slices (z spacing 5 mm; nnU-Net's 2D configuration trains on the
slices): an elliptic body (fat, a muscle rim, a bright vertebra) holding four structures of very different size
and contrast, the kind that separates networks that learn fast from slow ones:

* 1 ``organ``: a large lobed region, moderate contrast to the surrounding fat;
* 2 ``kidney``: one or two medium ellipses, bright;
* 3 ``vessel``: thin (1.5-3 px wide) curved tubes, bright, a few per slice;
* 4 ``lesion``: 0-3 small blobs inside the organ, low contrast.

Sizes, intensities, noise and spacings vary per slice. The nnU-Net pipeline (conversion, fingerprint, planning,
preprocessing) is :func:`nnpp.data.synthetic.prepare_dataset`.
"""
from __future__ import annotations

import numpy as np

from nnpp.data.synthetic import write_msd_task

LABELS = {"0": "background", "1": "organ", "2": "kidney", "3": "vessel", "4": "lesion"}


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dy + s * dx, -s * dy + c * dx
    return (u / ry) ** 2 + (v / rx) ** 2 <= 1.0


def _tube(yy, xx, rng, size, width):
    """A thin smooth curve (quadratic Bezier between two random points) of ``width`` pixels."""
    p0, p1, p2 = (rng.uniform(0.15, 0.85, 2) * size for _ in range(3))
    t = np.linspace(0, 1, 4 * size)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    d = np.full(yy.shape, np.inf)
    for py, px in pts[::2]:
        d = np.minimum(d, (yy - py) ** 2 + (xx - px) ** 2)
    return d <= (width / 2) ** 2


def synth_slice(rng: np.random.Generator, size: int = 80):
    """One slice: (image float32 HU, label uint8), both (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    body = _ellipse(yy, xx, c, c, size * rng.uniform(0.40, 0.47), size * rng.uniform(0.42, 0.48))
    image = np.full((size, size), -1000.0, dtype=np.float32)
    image[body] = rng.uniform(-110, -70)
    inner = _ellipse(yy, xx, c, c, size * 0.36, size * 0.40)
    muscle = body & ~inner
    image[muscle] = rng.uniform(35, 55)
    spine = _ellipse(yy, xx, c + size * 0.25, c, size * 0.07, size * 0.07)
    image[spine] = rng.uniform(350, 500)
    label = np.zeros((size, size), dtype=np.uint8)

    organ = np.zeros((size, size), dtype=bool)
    oc = np.array([c + rng.uniform(-0.1, 0.05) * size, c - rng.uniform(0.08, 0.18) * size])
    for _ in range(int(rng.integers(1, 3))):
        oy, ox = oc + rng.uniform(-0.06, 0.06, 2) * size
        organ |= _ellipse(yy, xx, oy, ox, *(rng.uniform(0.12, 0.2, 2) * size), rng.uniform(0, np.pi))
    organ &= inner & ~spine
    organ_hu = rng.uniform(40, 70)  # moderate contrast to the fat around it (and close to muscle)
    image[organ] = organ_hu
    label[organ] = 1

    for side in rng.permutation([-1, 1])[:int(rng.integers(1, 3))]:
        kidney = _ellipse(yy, xx, c + size * rng.uniform(0.08, 0.16), c + side * size * rng.uniform(0.22, 0.28),
                          size * rng.uniform(0.06, 0.09), size * rng.uniform(0.04, 0.06), rng.uniform(-0.5, 0.5))
        kidney &= inner & ~organ & ~spine
        image[kidney] = rng.uniform(150, 200)
        label[kidney] = 2

    for _ in range(int(rng.integers(2, 5))):
        vessel = _tube(yy, xx, rng, size, rng.uniform(1.5, 3.0)) & inner & ~spine & (label != 2)
        image[vessel] = rng.uniform(160, 230)
        label[vessel] = 3

    idx = np.argwhere(label == 1)
    for _ in range(int(rng.integers(0, 4)) if len(idx) else 0):
        ly, lx = idx[rng.integers(len(idx))]
        lesion = (label == 1) & _ellipse(yy, xx, ly, lx, *rng.uniform(1.5, 4.0, 2))
        image[lesion] = organ_hu - rng.uniform(20, 35)  # low contrast
        label[lesion] = 4

    image += rng.normal(0, rng.uniform(10, 20), (size, size)).astype(np.float32)
    return image, label


def make_msd_multi_task(root: str, task_id: int = 901, name: str = "SynthMulti", n_train: int = 30,
                        slices: int = 6, size: int = 80, seed: int = 0) -> str:
    """Write ``root/TaskXX_Name`` in MSD layout (imagesTr, labelsTr, dataset.json); return its path."""
    rng = np.random.default_rng(seed)

    def cases():
        for _ in range(n_train):
            pairs = [synth_slice(rng, size) for _ in range(slices)]
            image = np.stack([p[0] for p in pairs]).astype(np.int16)
            label = np.stack([p[1] for p in pairs])
            yield image, label, (5.0, *(2 * [float(rng.uniform(1.3, 1.7))]))
    return write_msd_task(root, task_id, name, "nnpp synthetic multi-structure CT-like 2D task (organ, kidney, "
                          "vessel, lesion)", LABELS, cases(), n_train, "multi")
