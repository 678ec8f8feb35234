"""Lung-mask post-processing: an anatomical prior applied to the thresholded U-Net output.

A frontal chest X-ray shows two lung fields, each one connected region without holes. The
rule (fixed before the hold-out was scored; recorded in the segmenter's metadata as
`postprocess`, so `models.inference.LungSegmenter.predict` and the evaluation use the same
function):

1. connected components of the mask (8-connectivity);
2. keep at most the `keep_largest` (2) largest, and of those only the ones with at least
   `min_fraction` (5%) of the largest one's area: islands outside the lungs (gastric
   bubble, soft tissue, labels) go, a small second lung stays;
3. fill holes: background regions (4-connected, the complement of 8-connectivity) that do
   not touch the image border become lung.

Pure NumPy (no SciPy in the dependencies): components are found over horizontal runs with a
union-find, so the cost grows with the number of runs (a few per row), not pixels.
"""

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

LabelArray = NDArray[np.int32]


@dataclass(frozen=True)
class PostProcess:
    keep_largest: int = 2
    min_fraction: float = 0.05
    fill_holes: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "connectivity": 8}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "PostProcess":
        return cls(
            keep_largest=int(config.get("keep_largest", 2)),
            min_fraction=float(config.get("min_fraction", 0.05)),
            fill_holes=bool(config.get("fill_holes", True)),
        )


def _runs(
    mask: NDArray[np.bool_],
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """(row, start, end) of every horizontal run of True, end exclusive, in row order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return rows_s.astype(np.int64), starts.astype(np.int64), ends.astype(np.int64)


def label_components(mask: NDArray[np.bool_], connectivity: int = 8) -> tuple[LabelArray, int]:
    """Connected components of a 2-D boolean mask: (labels 1..n, 0 = background), n."""
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    mask = np.asarray(mask, dtype=bool)
    rows, starts, ends = _runs(mask)
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reach = 1 if connectivity == 8 else 0
    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for r in range(1, mask.shape[0]):
        a, a_end = int(row_first[r - 1]), int(row_first[r])
        b, b_end = a_end, int(row_first[r + 1])
        while a < a_end and b < b_end:
            # Runs overlap (or touch diagonally, with 8-connectivity).
            if starts[a] < ends[b] + reach and starts[b] < ends[a] + reach:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if ends[a] < ends[b]:
                a += 1
            else:
                b += 1
    labels = np.zeros(mask.shape, dtype=np.int32)
    ids: dict[int, int] = {}
    for i in range(len(rows)):
        root = find(i)
        label = ids.setdefault(root, len(ids) + 1)
        labels[rows[i], starts[i] : ends[i]] = label
    return labels, len(ids)


def fill_holes(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Background regions not connected (4-connectivity) to the border become foreground."""
    mask = np.asarray(mask, dtype=bool)
    background, n = label_components(~mask, connectivity=4)
    if n == 0:
        return mask.copy()
    border = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.unique(border)] = True
    outside[0] = True  # label 0 is the foreground itself
    return np.asarray(mask | ~outside[background])


def clean_mask(mask: NDArray[np.bool_], rule: PostProcess | None = None) -> NDArray[np.bool_]:
    """Apply the rule in the module docstring to one thresholded lung mask."""
    rule = rule or PostProcess()
    labels, n = label_components(mask, connectivity=8)
    if n == 0:
        return np.zeros(np.shape(mask), dtype=bool)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-areas, kind="stable")[: rule.keep_largest]
    keep = [int(i) + 1 for i in order if areas[i] >= rule.min_fraction * areas[order[0]]]
    out = np.isin(labels, keep)
    return fill_holes(out) if rule.fill_holes else out
