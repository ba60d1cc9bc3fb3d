"""PNG export of figures: Kaleido driving the system Chromium, and the app without one (the PNG button is then replaced
by a caption that says what is missing)."""
from __future__ import annotations

import time

import plotly.graph_objects as go
import pytest

from app import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_png_export_of_a_small_figure():
    reason = figures.png_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    fig = go.Figure(go.Bar(x=["a", "b", "c"], y=[3, 1, 2]))
    fig.update_layout(width=320, height=240)
    t0 = time.perf_counter()
    png = figures.to_png(fig, scale=1)
    seconds = time.perf_counter() - t0
    assert png[:8] == PNG_SIGNATURE
    # IHDR holds width and height (big-endian, bytes 16..24): the figure's layout size at scale 1
    assert int.from_bytes(png[16:20], "big") == 320 and int.from_bytes(png[20:24], "big") == 240
    assert seconds < 120, f"one PNG export took {seconds:.1f} s"


def test_no_chromium_means_no_png_and_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    assert figures.chromium_path() is None and not figures.png_available()
    reason = figures.png_unavailable_reason()
    assert "BROWSER_PATH" in reason or "Kaleido" in reason
    with pytest.raises(figures.PngExportError, match="PNG export needs"):
        figures.to_png(go.Figure())


def test_page_shows_png_button_or_says_why(synthetic_store, make_app, monkeypatch, tmp_path):
    path, rome, _ = synthetic_store
    at = make_app(path, "metrics.py", {"runs": rome})
    labels = [b.proto.label for b in at.get("download_button")]
    if figures.png_available():
        assert "PNG" in labels
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    at.run()
    assert not at.exception
    assert "PNG" not in [b.proto.label for b in at.get("download_button")]
    assert any("PNG export needs" in c.value for c in at.caption)
