"""qc: black-pixel ratios against the plain definition, thresholds, SCL statistics."""
from __future__ import annotations

import numpy as np
import pytest

from gl10m import qc


def _naive(img, level):
    return float((img <= level).all(axis=-1).mean())


@pytest.mark.parametrize("level", [0, 3, 5, 7, 30])
def test_black_ratio_matches_definition(level):
    rng = np.random.default_rng(level)
    img = rng.integers(0, 12, size=(64, 80, 3), dtype=np.uint8)
    assert qc.black_ratio(img, level) == pytest.approx(_naive(img, level), abs=0)
    tiles = rng.integers(0, 9, size=(7, 16, 16, 3), dtype=np.uint8)
    assert qc.black_ratios(tiles, level).tolist() == pytest.approx([_naive(t, level) for t in tiles], abs=0)


def test_black_means_every_channel_at_most_level():
    img = np.array([[[5, 5, 5], [6, 0, 0], [0, 0, 6], [4, 2, 1]]], np.uint8)  # OR of 4|2|1 = 7 > 5
    assert qc.black_ratio(img, 5) == 0.5


def test_threshold_is_inclusive():
    tiles = np.full((3, 4, 4, 3), 100, np.uint8)
    tiles[1, :1] = 0          # 0.25 black -> invalid (>= 0.25)
    tiles[2, 0, :3] = 0       # 0.1875 -> fine
    ratios = qc.black_ratios(tiles, 5)
    assert ratios.tolist() == [0.0, 0.25, 0.1875]
    assert qc.failing_tiles(ratios, 0.25) == [1]


def test_bad_input_is_one_line_error():
    with pytest.raises(ValueError, match="uint8"):
        qc.black_ratio(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        qc.black_ratio(np.zeros((4, 4), np.uint8))


def test_scl_stats_fractions():
    scl = np.array([[0, 1, 3, 4], [8, 9, 10, 4]], np.uint8)
    s = qc.scl_stats(scl, [0, 1, 3, 8, 9, 10])
    assert s == {"cloud": 0.375, "shadow": 0.125, "nodata": 0.125, "masked": 0.75, "valid": 0.25}


def test_composite_stats():
    s = qc.composite_stats(np.array([[0, 1], [2, 3]]), 3)
    assert s == {"dates": 3, "uncovered": 0.25, "min_obs": 0, "mean_obs": 1.5}
