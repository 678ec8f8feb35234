"""Odd pixel data reaching the worker: each case is model input or `UnreadablePixels`.

`test_pixels.py` covers 1-bit, 32-bit float, 0x0, an over-limit 4000x4000 and the
colour files of the corpus. Here: the cases it leaves out (synthetic RGB, a
4000x4000 image under the default limit, 32-bit integers, 64-bit float, pixel data
shorter or longer than the header says, odd bit depths, signed data, a 1-bit image
whose size is not a multiple of 8), and a property over random headers: whatever
the header and the bytes, `read_frames` returns valid frames or raises
`UnreadablePixels`, never anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pack_bits

from tests.unit.workers.conftest import build
from workers.pixels import ImageFrame, UnreadablePixels, read_frames

Write = Callable[[Dataset], Path]


def _native(
    rows: int,
    columns: int,
    *,
    bits: int,
    data: bytes,
    samples: int = 1,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
) -> Dataset:
    ds = build(None, Rows=rows, Columns=columns, SamplesPerPixel=samples)
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.PixelData = data
    return ds


def _valid(frames: list[ImageFrame], rows: int, columns: int) -> None:
    assert frames
    for frame in frames:
        assert frame.pixels.shape == (rows, columns)
        assert frame.pixels.dtype == np.float32
        assert np.isfinite(frame.pixels).all()
        assert frame.pixels.min() >= 0.0 and frame.pixels.max() <= 1.0


def test_rgb_is_refused(write: Write) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    ds = _native(16, 16, bits=8, data=rgb.tobytes(), samples=3, photometric="RGB")
    with pytest.raises(UnreadablePixels, match=r"colour images \(RGB\) are not supported"):
        read_frames(write(ds))


def test_grayscale_with_three_samples_is_refused(write: Write) -> None:
    ds = _native(8, 8, bits=8, data=bytes(8 * 8 * 3), samples=3)
    with pytest.raises(UnreadablePixels, match="grayscale image with 3 samples per pixel"):
        read_frames(write(ds))


def test_4000_square_under_the_default_limit_is_read(write: Write) -> None:
    values = np.zeros((4000, 4000), np.uint16)
    values[1000:3000, 1000:3000] = 4095
    ds = build(values, BitsStored=12, HighBit=11)
    frames = read_frames(write(ds))
    _valid(frames, 4000, 4000)
    assert frames[0].pixels[2000, 2000] == 1.0 and frames[0].pixels[0, 0] == 0.0


def test_32_bit_integers_are_read(write: Write) -> None:
    values = np.arange(12 * 10, dtype=np.uint32).reshape(12, 10) * 100_000
    ds = _native(12, 10, bits=32, data=values.astype("<u4").tobytes())
    frames = read_frames(write(ds))
    _valid(frames, 12, 10)
    assert frames[0].pixels[0, 0] == 0.0 and frames[0].pixels[11, 9] == 1.0


def test_64_bit_float_is_read(write: Write) -> None:
    values = np.linspace(-1e6, 1e6, 20 * 8).reshape(20, 8)
    ds = build(None, Rows=20, Columns=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2")
    ds.BitsAllocated = 64
    ds.DoubleFloatPixelData = values.astype("<f8").tobytes()
    frames = read_frames(write(ds))
    _valid(frames, 20, 8)
    assert frames[0].voi_source == "robust range"


@pytest.mark.parametrize(
    "extremes",
    [
        (-1.7e308, -1e300, -1.0, 0.0, 2.0, 1e300, 1e307, 1.7e308),
        (0.0, 1e38, 2e38, 5e38, 1e39, 3e39, 1e40, 2e40),
        (-3e300, -1e-300, 0.0, 5e-300, 1e-299, 1.0, 3.0, 7.0),
    ],
    ids=["span-overflows", "beyond-float32", "tiny-and-huge"],
)
def test_64_bit_float_of_any_finite_magnitude_gives_finite_pixels(
    write: Write, extremes: tuple[float, ...]
) -> None:
    """Doubles beyond float32's range, or whose span overflows, once came out all NaN."""
    values = np.array(extremes, np.float64).reshape(1, 8)
    ds = build(None, Rows=1, Columns=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME1")
    ds.BitsAllocated = 64
    ds.DoubleFloatPixelData = values.astype("<f8").tobytes()
    frames = read_frames(write(ds))
    _valid(frames, 1, 8)
    assert frames[0].pixels.max() > frames[0].pixels.min()  # still an image, not a flat field


def test_float_without_finite_values_is_refused(write: Write) -> None:
    ds = build(None, Rows=4, Columns=4, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2")
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.full((4, 4), np.nan, "<f4").tobytes()
    with pytest.raises(UnreadablePixels, match="no finite values"):
        read_frames(write(ds))


def test_signed_16_bit_is_read(write: Write) -> None:
    values = np.linspace(-1024, 3071, 16 * 16).astype(np.int16).reshape(16, 16)
    ds = _native(16, 16, bits=16, data=values.astype("<i2").tobytes(), signed=True)
    frames = read_frames(write(ds))
    _valid(frames, 16, 16)
    assert frames[0].pixels[0, 0] == 0.0 and frames[0].pixels[15, 15] == 1.0


def test_one_bit_of_odd_size_is_read(write: Write) -> None:
    bits = np.zeros((7, 9), np.uint8)
    bits[2:5, 3:6] = 1
    ds = _native(7, 9, bits=1, data=pack_bits(bits))
    (frame,) = read_frames(write(ds))
    assert np.array_equal(frame.pixels, bits.astype(np.float32))


@pytest.mark.parametrize("length", [0, 2, 128, 254])
def test_pixel_data_shorter_than_the_header_says_is_refused(write: Write, length: int) -> None:
    ds = _native(16, 16, bits=8, data=bytes(length))
    with pytest.raises(UnreadablePixels, match="cannot be decoded"):
        read_frames(write(ds))


def test_pixel_data_longer_than_the_header_says_is_read(write: Write) -> None:
    """Trailing bytes (padding, or a sender's bug) do not change the image."""
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    ds = _native(8, 8, bits=8, data=image.tobytes() + bytes(64))
    frames = read_frames(write(ds))
    _valid(frames, 8, 8)


@pytest.mark.parametrize("bits", [12, 24, 7])
def test_bits_allocated_not_a_whole_number_of_bytes_is_refused(write: Write, bits: int) -> None:
    ds = _native(8, 8, bits=bits, data=bytes(8 * 8 * 4))
    with pytest.raises(UnreadablePixels):
        read_frames(write(ds))


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    rows=st.sampled_from([0, 1, 2, 7, 16, 33]),
    columns=st.sampled_from([0, 1, 3, 8, 16]),
    bits=st.sampled_from([1, 8, 16, 32, 64, 12]),
    samples=st.sampled_from([1, 3]),
    photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", ""]),
    frames=st.sampled_from([None, "0", "1", "2", "x"]),
    signed=st.booleans(),
    length=st.one_of(st.just(None), st.integers(0, 5000)),
    float_data=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_headers_give_frames_or_unreadable_pixels(
    write: Write,
    rows: int,
    columns: int,
    bits: int,
    samples: int,
    photometric: str,
    frames: str | None,
    signed: bool,
    length: int | None,
    float_data: bool,
    seed: int,
) -> None:
    """Never another exception: a worker must fail the study with a reason, not crash."""
    implied = (
        rows * columns * samples * bits * max(int(frames or 1) if frames != "x" else 1, 1) + 7
    ) // 8
    size = implied if length is None else length
    data = np.random.default_rng(seed).integers(0, 256, size + size % 2, dtype=np.uint8).tobytes()
    ds = _native(rows, columns, bits=bits, data=data, samples=samples, signed=signed)
    ds.PhotometricInterpretation = photometric
    if float_data and bits in (32, 64):
        del ds.PixelData
        ds.PixelRepresentation = 0
        keyword = "FloatPixelData" if bits == 32 else "DoubleFloatPixelData"
        setattr(ds, keyword, data[: len(data) - len(data) % (bits // 8)])
    if frames is not None:
        ds.add_new(0x00280008, "IS" if frames != "x" else "SH", frames)
    try:
        result = read_frames(write(ds))
    except UnreadablePixels as exc:
        assert exc.reason
        return
    _valid(result, rows, columns)
