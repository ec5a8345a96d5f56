"""preview.png: right size, features drawn where they are, robust to outliers, bounded sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from services.worker.conform.preview import PREVIEW_WIDTH_PX, PreviewSample, render_preview

BACKGROUND = np.array([246, 244, 239])


def drawn_mask(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return np.abs(pixels - BACKGROUND).sum(axis=2) > 30


def drawn_span(mask: np.ndarray) -> tuple[float, float]:
    """Width and height of the drawn pixels' bounding box, as fractions of the image."""
    ys, xs = np.nonzero(mask)
    return (xs.max() - xs.min()) / mask.shape[1], (ys.max() - ys.min()) / mask.shape[0]


def cluster(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-123.2, -122.8, count), rng.uniform(44.0, 44.3, count)


def test_png_of_the_right_width_with_points_drawn(tmp_path: Path) -> None:
    sample = PreviewSample()
    sample.add_points(*cluster(5000))
    path = tmp_path / "preview.png"
    render_preview(sample, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width == PREVIEW_WIDTH_PX
        # 0.4 deg of longitude at 44N is ~0.29 deg of "ground"; 0.3 deg of latitude: taller
        # than wide, and the height follows the aspect ratio.
        assert image.height > image.width
    mask = drawn_mask(path)
    assert mask.sum() > 5000  # thousands of dots, not a handful
    assert drawn_span(mask) > (0.8, 0.8)


def test_points_land_where_they_are(tmp_path: Path) -> None:
    # Two tight groups: west-south and east-north corners of the frame.
    lon = np.concatenate([np.full(50, 10.0), np.full(50, 11.0)])
    lat = np.concatenate([np.full(50, 50.0), np.full(50, 50.5)])
    sample = PreviewSample()
    sample.add_points(lon, lat)
    path = tmp_path / "preview.png"
    render_preview(sample, path)
    mask = drawn_mask(path)
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    assert mask[height // 2 - 20 : height // 2 + 20, width // 2 - 20 : width // 2 + 20].sum() == 0
    assert xs.min() < width * 0.1 and ys.max() > height * 0.9  # south-west dot, bottom left
    assert xs.max() > width * 0.9 and ys.min() < height * 0.1  # north-east dot, top right


def test_one_outlier_does_not_collapse_the_picture(tmp_path: Path) -> None:
    lon, lat = cluster(20_000)
    sample = PreviewSample()
    sample.add_points(np.append(lon, 0.0), np.append(lat, 0.0))  # a stray point at 0,0
    path = tmp_path / "preview.png"
    render_preview(sample, path)
    # The cluster still fills the frame rather than shrinking to a dot in a corner.
    assert drawn_span(drawn_mask(path)) > (0.8, 0.8)


def test_polygons_are_drawn_as_outlines(tmp_path: Path) -> None:
    sample = PreviewSample()
    sample.add_geometries(np.array([shapely.box(0, 0, 0.01, 0.01)]))
    path = tmp_path / "preview.png"
    render_preview(sample, path)
    mask = drawn_mask(path)
    height, width = mask.shape
    assert mask.any()
    assert not mask[height // 2, width // 2]  # hollow: the inside is not filled
    assert mask[height // 2].sum() >= 2  # both vertical edges cross the middle row


def test_reservoir_stays_bounded_and_uniform() -> None:
    sample = PreviewSample(max_points=1000)
    for start in range(0, 100_000, 10_000):
        values = np.arange(start, start + 10_000, dtype=float)
        sample.add_points(values, values)
    assert sample.points_seen == 100_000
    assert sample.points.shape == (1000, 2)
    # A uniform sample of 0..99999 has a mean near 50000 (sd of the mean ~ 900).
    assert abs(sample.points[:, 0].mean() - 50_000) < 5_000
    assert len(np.unique(sample.points[:, 0])) == 1000


def test_huge_shapes_are_decimated() -> None:
    circle = shapely.Point(0, 0).buffer(1, quad_segs=5000)
    sample = PreviewSample()
    sample.add_geometries(np.array([circle]))
    assert sum(len(line) for line in sample.outlines) <= 300


def test_empty_sample_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        render_preview(PreviewSample(), tmp_path / "preview.png")
