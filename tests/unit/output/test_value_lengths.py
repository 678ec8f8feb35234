"""Values we write fit their VR (PS3.5 6.2), whatever the model calls itself.

`read_back` reads every value with pydicom raising on an invalid one (length
included) and runs dciodvfy, so an object that reads back is within its limits.
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset

from tests.unit.output.conftest import CLASSIFIER, CTX, make_result, synthetic_cr
from workers.output import AlgorithmInfo
from workers.result_objects import build_objects

ReadBack = Callable[[Dataset, str], Dataset]


def _texts(sr: Dataset) -> set[str]:
    return {str(e.value) for e in sr.iterall() if e.keyword == "TextValue"}


def test_longest_names_fit(read_back: ReadBack) -> None:
    segmenter = AlgorithmInfo(
        "lung-unet-" + "x" * 54,  # 64: the longest LO
        "1.2.3-rc.1+" + "b" * 53,
        family="Convolutional neural network for lung segmentation of chest radiographs",
    )
    objects = build_objects(
        [make_result(synthetic_cr(), 1)], classifier=CLASSIFIER, segmenter=segmenter, ctx=CTX
    )
    assert sorted(kind for kind, _ in objects) == ["sc", "seg", "sr"]
    for kind, ds in objects:
        back = read_back(ds, f"longest-{kind}")
        if kind == "seg":
            algorithm = back.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            assert algorithm.AlgorithmName == segmenter.name
            assert algorithm.AlgorithmVersion == segmenter.version


def test_too_long_a_model_name_costs_only_the_seg(read_back: ReadBack) -> None:
    segmenter = AlgorithmInfo("lung-unet-" + "x" * 60, "0.3.1")  # 70 > LO 64
    objects = build_objects(
        [make_result(synthetic_cr(), 1)], classifier=CLASSIFIER, segmenter=segmenter, ctx=CTX
    )
    assert sorted(kind for kind, _ in objects) == ["sc", "sr"]
    sr = read_back(next(ds for kind, ds in objects if kind == "sr"), "long-name-sr")
    assert {CLASSIFIER.name, CLASSIFIER.version} <= _texts(sr)
