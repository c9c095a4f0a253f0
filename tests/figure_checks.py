"""Figure content checks without a browser: every drawn artist inside the canvas, every image decodes.

A colour bar or a tick label drawn past the canvas edge is cut in any image rendered at the figure's size
(W&B gets such an image: :func:`optipfair_train.bias.figures.figure_to_rgb`), while a ``bbox_inches="tight"``
PNG would hide the fault; so the check draws the figure at its own size and compares window extents.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.text import Text


def outside_canvas(fig: Figure, tolerance: float = 1.0) -> list[str]:
    """Descriptions of the visible texts and axes (colour bars included) that reach past the canvas."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    bad = []
    artists = [a for a in fig.findobj(lambda a: isinstance(a, (Text, Axes))) if a.get_visible()]
    for artist in artists:
        if isinstance(artist, Text) and (not artist.get_text().strip() or id(artist) in _undrawn_ticks(fig)):
            continue
        box = artist.get_window_extent(renderer)
        if (
            box.x0 < -tolerance
            or box.y0 < -tolerance
            or box.x1 > width + tolerance
            or box.y1 > height + tolerance
        ):
            name = artist.get_text() if isinstance(artist, Text) else f"axes {artist.get_label() or ''}"
            bad.append(f"{type(artist).__name__} {name!r} at {box.bounds}, canvas {width:.0f}x{height:.0f}")
    return bad


def _undrawn_ticks(fig: Figure) -> set[int]:
    """Tick labels matplotlib keeps but does not draw (their tick lies outside the axis' view)."""
    skip = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            margin = 1e-9 * max(1.0, abs(high - low))
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - margin <= tick.get_loc() <= high + margin:
                    skip |= {id(tick.label1), id(tick.label2)}
    return skip


def texts(fig: Figure) -> list[str]:
    """Every visible non-empty text of the figure (titles, labels, tick labels, annotations)."""
    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def report_images(html: str) -> list[np.ndarray]:
    """Every inline PNG of a report, decoded (raises if one does not decode)."""
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [imread(io.BytesIO(base64.b64decode(data)), format="png") for data in found]
