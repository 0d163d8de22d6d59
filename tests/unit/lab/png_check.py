"""The check every lab model's --plot must pass: a real, readable PNG with something drawn in it."""

from __future__ import annotations

from pathlib import Path


def assert_real_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
    assert float(pixels[..., :3].std()) > 0.05
