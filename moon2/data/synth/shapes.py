"""Procedural product silhouettes and detail-stroke masks for the synthetic catalog.

Each shape is described in normalised coordinates (0..1, y pointing down) and auto-fitted:
the silhouette's bounding box (tracked analytically while recording) is centred and scaled so
its larger side spans ``_FILL`` of the output. Both masks are drawn at 4x (2x above 256 px,
1x above 1024) and box-reduced, which anti-aliases the edges. Detail strokes are clipped to
the silhouette.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from PIL import Image, ImageChops, ImageDraw

Point = tuple[float, float]

_FILL = 0.76  # larger side of the silhouette bbox, as a fraction of the canvas


# --------------------------------------------------------------------------- geometry helpers


def _arc(
    cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 24
) -> list[Point]:
    """Points on an elliptical arc; angles in degrees, clockwise on screen (PIL convention)."""
    out = []
    for i in range(n + 1):
        a = math.radians(a0 + (a1 - a0) * i / n)
        out.append((cx + rx * math.cos(a), cy + ry * math.sin(a)))
    return out


def _bez(*ctrl: Point, n: int = 12) -> list[Point]:
    """Points on a Bezier curve of any degree."""
    deg = len(ctrl) - 1
    out = []
    for i in range(n + 1):
        t = i / n
        x = y = 0.0
        for k, (px, py) in enumerate(ctrl):
            b = math.comb(deg, k) * t**k * (1 - t) ** (deg - k)
            x += b * px
            y += b * py
        out.append((x, y))
    return out


def _chain(*parts: Sequence[Point]) -> list[Point]:
    """Concatenate point runs, dropping the duplicated joint points."""
    out: list[Point] = []
    for part in parts:
        out.extend(part[1:] if out and part and out[-1] == part[0] else part)
    return out


def _sym(half: Sequence[Point]) -> list[Point]:
    """Mirror a right-hand half (running from the centre line back to it) about x = 0.5."""
    return [(1.0 - x, y) for x, y in reversed(half)] + list(half)


def _mx(pts: Sequence[Point]) -> list[Point]:
    """Mirror points about x = 0.5."""
    return [(1.0 - x, y) for x, y in pts]


def _toward(p: Point, q: Point, r: float) -> Point:
    dx, dy = q[0] - p[0], q[1] - p[1]
    dist = math.hypot(dx, dy)
    t = min(r, dist / 2) / dist if dist else 0.0
    return (p[0] + dx * t, p[1] + dy * t)


def _rounded(pts: Sequence[Point], r: float, n: int = 5) -> list[Point]:
    """Closed polygon with every corner rounded by radius ~r."""
    out: list[Point] = []
    m = len(pts)
    for i in range(m):
        p0, p1, p2 = pts[i - 1], pts[i], pts[(i + 1) % m]
        out.extend(_bez(_toward(p1, p0, r), p1, _toward(p1, p2, r), n=n))
    return out


def _smooth(pts: Sequence[Point], iters: int = 3) -> list[Point]:
    """Chaikin corner cutting of a closed polygon, for organic outlines."""
    cur = list(pts)
    for _ in range(iters):
        nxt: list[Point] = []
        for i, (x0, y0) in enumerate(cur):
            x1, y1 = cur[(i + 1) % len(cur)]
            nxt.append((0.75 * x0 + 0.25 * x1, 0.75 * y0 + 0.25 * y1))
            nxt.append((0.25 * x0 + 0.75 * x1, 0.25 * y0 + 0.75 * y1))
        cur = nxt
    return cur


def _scale(pts: Sequence[Point], f: float, cx: float, cy: float) -> list[Point]:
    return [(cx + (x - cx) * f, cy + (y - cy) * f) for x, y in pts]


def _lerp(p: Point, q: Point, t: float) -> Point:
    return (p[0] + (q[0] - p[0]) * t, p[1] + (q[1] - p[1]) * t)


def _rrect_pts(x0: float, y0: float, x1: float, y1: float, r: float) -> list[Point]:
    """Closed outline of a rounded rectangle, clockwise from the top-left corner."""
    return _chain(
        _arc(x1 - r, y0 + r, r, r, 270, 360, 6),
        _arc(x1 - r, y1 - r, r, r, 0, 90, 6),
        _arc(x0 + r, y1 - r, r, r, 90, 180, 6),
        _arc(x0 + r, y0 + r, r, r, 180, 270, 6),
        [(x1 - r, y0)],
    )


def _dashes(pts: Sequence[Point], on: float, off: float) -> list[list[Point]]:
    """Split a polyline into dashes of length `on` separated by gaps of length `off`."""
    out: list[list[Point]] = []
    cur = [pts[0]]
    left, drawing = on, True
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        seg = math.hypot(x1 - x0, y1 - y0)
        t = 0.0
        while seg - t > left:
            t += left
            p = (x0 + (x1 - x0) * t / seg, y0 + (y1 - y0) * t / seg)
            if drawing:
                cur.append(p)
                out.append(cur)
            else:
                cur = [p]
            drawing = not drawing
            left = on if drawing else off
        left -= seg - t
        if drawing:
            cur.append((x1, y1))
    if drawing and len(cur) > 1:
        out.append(cur)
    return out


# --------------------------------------------------------------------------- recording pen


def _polyline(draw: ImageDraw.ImageDraw, pts: list[Point], width: float, fill: int) -> None:
    """Thick polyline as one mitred outline polygon with round caps.

    PIL's own wide lines leave notches at joints and joint="curve" is slow (a pieslice per
    vertex); an offset outline is smooth along dense curve samples and cheap.
    """
    if width <= 2.5:
        draw.line(pts, fill=fill, width=max(1, round(width)))
        return
    h = width / 2
    pts = [pts[0], *(q for p, q in itertools.pairwise(pts) if q != p)]
    if len(pts) > 1:
        normals = []
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            seg = math.hypot(x1 - x0, y1 - y0)
            normals.append(((y0 - y1) / seg, (x1 - x0) / seg))
        left, right = [], []
        for i, (x, y) in enumerate(pts):
            a, b = normals[max(i - 1, 0)], normals[min(i, len(normals) - 1)]
            nx, ny = a[0] + b[0], a[1] + b[1]
            norm = math.hypot(nx, ny)
            if norm < 1e-9:  # the path doubles back: no sensible mitre
                nx, ny, norm = a[0], a[1], 1.0
            nx, ny = nx / norm, ny / norm
            m = h / max(nx * a[0] + ny * a[1], 0.34)  # mitre length, capped at ~3 half-widths
            left.append((x + nx * m, y + ny * m))
            right.append((x - nx * m, y - ny * m))
        draw.polygon(left + right[::-1], fill=fill)
    for x, y in (pts[0], pts[-1]):
        draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)


class _Xf(NamedTuple):
    """Maps normalised coordinates to canvas pixels: X = (x - ox) * k.

    sw is the detail stroke width and px one output pixel, both in canvas pixels.
    """

    ox: float
    oy: float
    k: float
    sw: float
    px: float

    def pts(self, pts: Sequence[Point]) -> list[Point]:
        return [((x - self.ox) * self.k, (y - self.oy) * self.k) for x, y in pts]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, ...]:
        k = self.k
        return ((x0 - self.ox) * k, (y0 - self.oy) * k, (x1 - self.ox) * k, (y1 - self.oy) * k)


_Op = Callable[[ImageDraw.ImageDraw, _Xf], None]


class _Pen:
    """Records drawing ops in normalised coordinates, replayed once the transform is known.

    Filled primitives have normalised sizes; stroke widths (`k`) are multiples of the detail
    stroke width. The bounding box of everything filled with 255 is tracked analytically so the
    shape can be fitted to the canvas before any pixel is drawn.
    """

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.bounds = [math.inf, math.inf, -math.inf, -math.inf]

    def _grow(self, pts: Sequence[Point], pad: float = 0.0) -> None:
        b = self.bounds
        for x, y in pts:
            b[0], b[1] = min(b[0], x - pad), min(b[1], y - pad)
            b[2], b[3] = max(b[2], x + pad), max(b[3], y + pad)

    def render(self, img: Image.Image, xf: _Xf) -> None:
        draw = ImageDraw.Draw(img)
        for op in self.ops:
            op(draw, xf)

    # filled primitives (silhouette parts, cutouts with fill=0, detail blobs)
    def poly(self, pts: Sequence[Point], fill: int = 255) -> None:
        if fill:
            self._grow(pts)
        self.ops.append(lambda d, t: d.polygon(t.pts(pts), fill=fill))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: int = 255) -> None:
        if fill:
            self._grow([(cx - rx, cy - ry), (cx + rx, cy + ry)])
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        self.ops.append(lambda d, t: d.ellipse(t.box(*box), fill=fill))

    def rect(
        self, x0: float, y0: float, x1: float, y1: float, r: float = 0.0, fill: int = 255
    ) -> None:
        if fill:
            self._grow([(x0, y0), (x1, y1)])
        self.ops.append(
            lambda d, t: d.rounded_rectangle(t.box(x0, y0, x1, y1), radius=r * t.k, fill=fill)
        )

    def line(self, pts: Sequence[Point], w: float, fill: int = 255) -> None:
        """Thick polyline with round caps; width normalised.

        Never thinner than ~1.3 output px, so handles and straps survive at tiny sizes.
        """
        if fill:
            self._grow(pts, w / 2)
        self.ops.append(lambda d, t: _polyline(d, t.pts(pts), max(w * t.k, 1.3 * t.px), fill))

    def dot(self, cx: float, cy: float, r: float) -> None:
        """Filled disk, never thinner than the detail stroke."""

        def op(d: ImageDraw.ImageDraw, t: _Xf) -> None:
            rr = max(r * t.k, 0.6 * t.sw)
            x, y = (cx - t.ox) * t.k, (cy - t.oy) * t.k
            d.ellipse((x - rr, y - rr, x + rr, y + rr), fill=255)

        self.ops.append(op)

    # strokes (detail lines)
    def stroke(self, pts: Sequence[Point], k: float = 1.0) -> None:
        self.ops.append(lambda d, t: _polyline(d, t.pts(pts), k * t.sw, 255))

    def mstroke(self, pts: Sequence[Point], k: float = 1.0) -> None:
        """Stroke and its mirror image about x = 0.5."""
        self.stroke(pts, k)
        self.stroke(_mx(pts), k)

    def closed(self, pts: Sequence[Point], k: float = 1.0) -> None:
        self.stroke([*pts, pts[0], pts[1]], k)

    def ring(self, cx: float, cy: float, rx: float, ry: float, k: float = 1.0) -> None:
        """Ellipse outline centred on the given ellipse."""

        def op(d: ImageDraw.ImageDraw, t: _Xf) -> None:
            w = max(1, round(k * t.sw))
            x0, y0, x1, y1 = t.box(cx - rx, cy - ry, cx + rx, cy + ry)
            d.ellipse((x0 - w / 2, y0 - w / 2, x1 + w / 2, y1 + w / 2), outline=255, width=w)

        self.ops.append(op)

    def frame(
        self, x0: float, y0: float, x1: float, y1: float, r: float = 0.0, k: float = 1.0
    ) -> None:
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        self.closed(_rrect_pts(x0, y0, x1, y1, r) if r else corners, k)


_DrawFn = Callable[[_Pen, _Pen], None]
_SHAPES: dict[str, _DrawFn] = {}


def _shape(name: str) -> Callable[[_DrawFn], _DrawFn]:
    def register(fn: _DrawFn) -> _DrawFn:
        _SHAPES[name] = fn
        return fn

    return register


# --------------------------------------------------------------------------- apparel


@_shape("tshirt")
def _tshirt(s: _Pen, d: _Pen) -> None:
    neck = _bez((0.5, 0.2), (0.56, 0.2), (0.6, 0.17), (0.61, 0.13))
    sleeve = [(0.7, 0.16), (0.91, 0.32), (0.82, 0.45), (0.71, 0.38)]
    s.poly(_sym([*neck, *sleeve, (0.72, 0.88), (0.5, 0.88)]))
    d.stroke(_sym([(x, y + 0.035) for x, y in neck]))
    d.mstroke([(0.87, 0.29), (0.79, 0.41)])
    d.stroke([(0.28, 0.84), (0.72, 0.84)])


@_shape("shirt")
def _shirt(s: _Pen, d: _Pen) -> None:
    half = [
        (0.5, 0.17),
        (0.565, 0.085),
        (0.6, 0.1),
        (0.7, 0.14),
        (0.78, 0.28),
        (0.87, 0.8),
        (0.775, 0.81),
        (0.72, 0.36),
        (0.72, 0.84),
    ]
    s.poly(_sym(_chain(half, _bez((0.72, 0.84), (0.7, 0.92), (0.6, 0.92), (0.5, 0.9)))))
    d.mstroke([(0.5, 0.17), (0.55, 0.24), (0.6, 0.11)])
    d.stroke([(0.525, 0.2), (0.525, 0.9)])
    for y in (0.3, 0.42, 0.54, 0.66, 0.78):
        d.dot(0.5, y, 0.012)
    d.mstroke([(0.772, 0.72), (0.862, 0.72)])
    d.frame(0.58, 0.3, 0.67, 0.4)


@_shape("hoodie")
def _hoodie(s: _Pen, d: _Pen) -> None:
    s.ellipse(0.5, 0.17, 0.15, 0.13)
    half = _chain(
        [(0.5, 0.2), (0.63, 0.22), (0.72, 0.25)],
        _bez((0.72, 0.25), (0.84, 0.4), (0.88, 0.6), (0.9, 0.87)),
        [(0.79, 0.87), (0.735, 0.46), (0.73, 0.8), (0.71, 0.9), (0.5, 0.9)],
    )
    s.poly(_sym(half))
    d.ring(0.5, 0.19, 0.085, 0.095)
    d.mstroke([(0.465, 0.285), (0.455, 0.41)])
    d.closed([(0.34, 0.77), (0.38, 0.6), (0.62, 0.6), (0.66, 0.77)])
    d.stroke([(0.26, 0.8), (0.74, 0.8)])
    d.mstroke([(0.785, 0.81), (0.9, 0.81)])


@_shape("sweater")
def _sweater(s: _Pen, d: _Pen) -> None:
    neck = _bez((0.5, 0.17), (0.56, 0.17), (0.59, 0.15), (0.6, 0.12))
    s.poly(
        _sym(
            [
                *neck,
                (0.69, 0.15),
                (0.8, 0.3),
                (0.95, 0.6),
                (0.88, 0.66),
                (0.74, 0.42),
                (0.73, 0.8),
                (0.7, 0.88),
                (0.5, 0.88),
            ]
        )
    )
    d.stroke(_sym([(x, y + 0.03) for x, y in neck]))
    d.mstroke([(0.925, 0.555), (0.855, 0.615)])
    d.stroke([(0.27, 0.8), (0.73, 0.8)])
    for i in range(11):
        x = 0.3 + i * 0.04
        d.stroke([(x, 0.815), (x, 0.875)], 0.7)
    for dx in (-0.07, 0.07):
        zig = [(0.5 + dx + (0.03 if i % 2 else -0.03), 0.26 + i * 0.06) for i in range(9)]
        d.stroke(zig, 0.8)


@_shape("jacket")
def _jacket(s: _Pen, d: _Pen) -> None:
    half = [
        (0.5, 0.08),
        (0.59, 0.08),
        (0.61, 0.12),
        (0.75, 0.16),
        (0.84, 0.3),
        (0.91, 0.72),
        (0.89, 0.8),
        (0.79, 0.8),
        (0.78, 0.72),
        (0.75, 0.42),
        (0.75, 0.72),
        (0.73, 0.82),
        (0.5, 0.82),
    ]
    s.poly(_sym(half))
    d.stroke([(0.41, 0.13), (0.59, 0.13)])
    d.stroke([(0.5, 0.08), (0.5, 0.82)])
    for i in range(16):
        y = 0.16 + i * 0.038
        d.stroke([(0.485, y), (0.515, y)], 0.6)
    d.frame(0.51, 0.14, 0.535, 0.2)
    d.stroke([(0.255, 0.73), (0.745, 0.73)])
    d.mstroke([(0.775, 0.72), (0.905, 0.72)])
    d.mstroke([(0.6, 0.5), (0.65, 0.64)])


@_shape("coat")
def _coat(s: _Pen, d: _Pen) -> None:
    half = [
        (0.5, 0.12),
        (0.58, 0.07),
        (0.7, 0.11),
        (0.78, 0.24),
        (0.86, 0.62),
        (0.78, 0.64),
        (0.705, 0.34),
        (0.77, 0.94),
        (0.5, 0.94),
    ]
    s.poly(_sym(half))
    d.mstroke([(0.57, 0.09), (0.6, 0.22), (0.56, 0.24), (0.5, 0.44), (0.5, 0.94)])
    for y in (0.52, 0.62, 0.72):
        d.dot(0.44, y, 0.012)
        d.dot(0.56, y, 0.012)
    d.stroke([(0.28, 0.44), (0.72, 0.44)])
    d.stroke([(0.28, 0.48), (0.72, 0.48)])
    d.mstroke([(0.6, 0.74), (0.69, 0.72)])
    d.mstroke([(0.77, 0.58), (0.85, 0.56)])


@_shape("jeans")
def _jeans(s: _Pen, d: _Pen) -> None:
    half = [(0.5, 0.08), (0.72, 0.08), (0.735, 0.18), (0.77, 0.92), (0.585, 0.92), (0.5, 0.42)]
    s.poly(_sym(half))
    d.stroke([(0.27, 0.15), (0.73, 0.15)])
    d.dot(0.5, 0.115, 0.012)
    d.stroke([(0.47, 0.15), (0.47, 0.27), (0.5, 0.31)])
    d.mstroke(_bez((0.62, 0.15), (0.63, 0.22), (0.68, 0.25), (0.735, 0.25)))
    for x in (0.36, 0.64):
        d.stroke([(x, 0.08), (x, 0.16)], 1.2)
    d.mstroke([(0.585, 0.885), (0.77, 0.885)])


@_shape("shorts")
def _shorts(s: _Pen, d: _Pen) -> None:
    s.poly(_sym([(0.5, 0.18), (0.73, 0.18), (0.75, 0.28), (0.85, 0.78), (0.57, 0.82), (0.5, 0.52)]))
    d.stroke([(0.26, 0.25), (0.74, 0.25)])
    d.dot(0.5, 0.215, 0.012)
    d.stroke([(0.47, 0.25), (0.47, 0.4), (0.5, 0.44)])
    d.mstroke(_bez((0.62, 0.25), (0.63, 0.32), (0.68, 0.36), (0.76, 0.36)))
    d.mstroke([(0.56, 0.77), (0.84, 0.73)])


@_shape("skirt")
def _skirt(s: _Pen, d: _Pen) -> None:
    half = _chain(
        [(0.5, 0.12), (0.66, 0.12), (0.67, 0.2), (0.85, 0.84)],
        _bez((0.85, 0.84), (0.75, 0.9), (0.6, 0.91), (0.5, 0.91)),
    )
    s.poly(_sym(half))
    d.stroke([(0.33, 0.19), (0.67, 0.19)])
    for xa, xb in ((0.42, 0.3), (0.5, 0.5), (0.58, 0.7), (0.36, 0.2), (0.64, 0.8)):
        d.stroke([(xa, 0.21), (xb, 0.88)])


@_shape("dress")
def _dress(s: _Pen, d: _Pen) -> None:
    half = _chain(
        _bez((0.5, 0.22), (0.53, 0.22), (0.56, 0.18), (0.565, 0.06)),
        _bez((0.62, 0.06), (0.63, 0.16), (0.66, 0.2), (0.665, 0.26)),
        [(0.62, 0.44), (0.86, 0.88)],
        _bez((0.86, 0.88), (0.75, 0.93), (0.6, 0.94), (0.5, 0.94)),
    )
    s.poly(_sym(half))
    d.stroke(_bez((0.37, 0.44), (0.5, 0.47), (0.63, 0.44)))
    d.mstroke([(0.55, 0.5), (0.63, 0.9)])
    d.mstroke(_bez((0.5, 0.28), (0.55, 0.3), (0.58, 0.34), (0.6, 0.38)))


# --------------------------------------------------------------------------- footwear


@_shape("sneaker")
def _sneaker(s: _Pen, d: _Pen) -> None:
    s.poly(
        _chain(
            _bez((0.12, 0.34), (0.16, 0.42), (0.28, 0.42), (0.33, 0.4)),
            [(0.38, 0.3), (0.46, 0.27), (0.5, 0.31)],
            _bez((0.5, 0.31), (0.62, 0.42), (0.8, 0.48), (0.88, 0.54)),
            _bez((0.88, 0.54), (0.95, 0.58), (0.95, 0.7), (0.9, 0.72)),
            [(0.12, 0.72)],
            _bez((0.12, 0.72), (0.07, 0.72), (0.07, 0.62), (0.08, 0.56)),
            [(0.09, 0.45)],
        )
    )
    d.stroke([(0.07, 0.63), (0.95, 0.63)])
    for i in range(4):
        x, y = _lerp((0.48, 0.34), (0.7, 0.45), i / 3)
        d.stroke([(x - 0.015, y - 0.005), (x + 0.02, y + 0.045)], 1.2)
    d.stroke(_bez((0.26, 0.57), (0.45, 0.61), (0.62, 0.52), (0.76, 0.45)), 1.3)
    d.stroke(_bez((0.77, 0.63), (0.79, 0.57), (0.84, 0.55), (0.88, 0.56)))
    d.stroke([(0.14, 0.4), (0.13, 0.6)])


@_shape("boot")
def _boot(s: _Pen, d: _Pen) -> None:
    s.poly(
        _chain(
            [(0.22, 0.06), (0.5, 0.06), (0.52, 0.5)],
            _bez((0.52, 0.5), (0.62, 0.58), (0.84, 0.6), (0.9, 0.72)),
            [(0.91, 0.8), (0.9, 0.86), (0.42, 0.86), (0.4, 0.92)],
            [(0.2, 0.92), (0.19, 0.8), (0.21, 0.5)],
        )
    )
    d.stroke([(0.18, 0.8), (0.92, 0.8)])
    d.stroke([(0.19, 0.86), (0.42, 0.86)])
    d.stroke([(0.22, 0.12), (0.5, 0.12)])
    for i in range(5):
        y = 0.16 + i * 0.07
        d.stroke([(0.42, y), (0.52, y + 0.05)])
        d.stroke([(0.42, y + 0.05), (0.52, y)])
    d.stroke(_bez((0.74, 0.8), (0.74, 0.67), (0.8, 0.63), (0.87, 0.66)))


@_shape("sandal")
def _sandal(s: _Pen, d: _Pen) -> None:
    s.poly(
        _chain(
            _bez((0.06, 0.7), (0.06, 0.66), (0.1, 0.65), (0.3, 0.67)),
            _bez((0.3, 0.67), (0.5, 0.7), (0.8, 0.7), (0.9, 0.7)),
            _bez((0.9, 0.7), (0.95, 0.7), (0.95, 0.78), (0.9, 0.78)),
            _bez((0.1, 0.78), (0.06, 0.78), (0.05, 0.74), (0.06, 0.7)),
        )
    )
    s.line(_arc(0.74, 0.71, 0.12, 0.16, 180, 360), 0.06)
    s.line(_arc(0.5, 0.71, 0.1, 0.25, 180, 360), 0.05)
    s.line([(0.12, 0.69), (0.16, 0.38)], 0.05)
    s.line(_arc(0.25, 0.39, 0.11, 0.045, 0, 360, 32), 0.035)
    s.line([(0.35, 0.41), (0.47, 0.47)], 0.035)
    d.stroke(_bez((0.07, 0.7), (0.1, 0.685), (0.3, 0.7), (0.92, 0.725)))
    d.frame(0.33, 0.38, 0.37, 0.43)
    for i in range(9):
        x = 0.12 + i * 0.095
        d.stroke([(x, 0.755), (x + 0.03, 0.755)], 0.8)


@_shape("high_heel")
def _high_heel(s: _Pen, d: _Pen) -> None:
    s.poly(
        _chain(
            _bez((0.13, 0.34), (0.22, 0.4), (0.4, 0.5), (0.54, 0.54)),
            _bez((0.54, 0.54), (0.7, 0.53), (0.86, 0.6), (0.95, 0.7)),
            _bez((0.95, 0.7), (0.94, 0.74), (0.88, 0.75), (0.8, 0.75)),
            _bez((0.8, 0.75), (0.62, 0.74), (0.44, 0.66), (0.3, 0.55)),
            _bez((0.3, 0.55), (0.24, 0.6), (0.23, 0.75), (0.235, 0.92)),
            [(0.205, 0.92)],
            _bez((0.205, 0.92), (0.2, 0.74), (0.17, 0.62), (0.11, 0.54)),
            _bez((0.11, 0.54), (0.09, 0.46), (0.1, 0.38), (0.13, 0.34)),
        )
    )
    d.stroke(_bez((0.86, 0.725), (0.62, 0.715), (0.44, 0.64), (0.31, 0.53)))
    d.stroke(_bez((0.12, 0.53), (0.18, 0.54), (0.25, 0.55), (0.31, 0.53)))
    d.stroke([(0.2, 0.895), (0.24, 0.895)])
    d.stroke(_bez((0.54, 0.56), (0.6, 0.6), (0.62, 0.66), (0.6, 0.71)), 0.8)


@_shape("slipper")
def _slipper(s: _Pen, d: _Pen) -> None:
    foot = [
        (-0.04, 0.06),
        (0.06, 0.08),
        (0.14, 0.18),
        (0.15, 0.34),
        (0.11, 0.62),
        (0.11, 0.84),
        (0.04, 0.93),
        (-0.06, 0.93),
        (-0.11, 0.84),
        (-0.1, 0.62),
        (-0.13, 0.34),
        (-0.12, 0.14),
    ]
    for cx, sx in ((0.67, 1.0), (0.33, -1.0)):
        outline = _smooth([(cx + sx * x, y) for x, y in foot])
        s.poly(outline)
        vamp = _bez((cx - 0.13, 0.52), (cx - 0.06, 0.38), (cx + 0.06, 0.38), (cx + 0.13, 0.52))
        d.stroke(vamp, 2.0)
        d.stroke([p for p in _scale(outline, 0.8, cx, 0.56) if p[1] > 0.5])
        d.dot(cx + sx * 0.01, 0.25, 0.03)


# --------------------------------------------------------------------------- bags


@_shape("backpack")
def _backpack(s: _Pen, d: _Pen) -> None:
    s.line(_arc(0.5, 0.2, 0.08, 0.09, 180, 360), 0.035)
    s.ellipse(0.5, 0.34, 0.28, 0.16)
    s.rect(0.22, 0.34, 0.78, 0.9, r=0.07)
    s.rect(0.17, 0.4, 0.23, 0.84, r=0.025)
    s.rect(0.77, 0.4, 0.83, 0.84, r=0.025)
    d.stroke(_arc(0.5, 0.36, 0.23, 0.12, 195, 345))
    d.frame(0.3, 0.56, 0.7, 0.84, r=0.05)
    d.stroke([(0.33, 0.62), (0.67, 0.62)])
    d.stroke([(0.62, 0.62), (0.62, 0.68)], 1.4)
    d.mstroke([(0.225, 0.44), (0.225, 0.8)])


@_shape("handbag")
def _handbag(s: _Pen, d: _Pen) -> None:
    s.line(_arc(0.5, 0.42, 0.17, 0.3, 180, 360), 0.04)
    s.poly(_rounded([(0.25, 0.4), (0.75, 0.4), (0.88, 0.88), (0.12, 0.88)], 0.04))
    d.stroke(_bez((0.23, 0.47), (0.36, 0.64), (0.64, 0.64), (0.77, 0.47)))
    d.frame(0.46, 0.58, 0.54, 0.65)
    d.stroke([(0.14, 0.83), (0.86, 0.83)])
    d.dot(0.33, 0.43, 0.015)
    d.dot(0.67, 0.43, 0.015)


@_shape("tote")
def _tote(s: _Pen, d: _Pen) -> None:
    s.line(_bez((0.33, 0.4), (0.33, 0.0), (0.67, 0.0), (0.67, 0.4)), 0.03)
    s.poly(_rounded([(0.2, 0.38), (0.8, 0.38), (0.76, 0.9), (0.24, 0.9)], 0.02))
    d.stroke([(0.2, 0.44), (0.8, 0.44)])
    d.frame(0.31, 0.38, 0.35, 0.5)
    d.frame(0.65, 0.38, 0.69, 0.5)
    d.ring(0.5, 0.67, 0.09, 0.09)


@_shape("wallet")
def _wallet(s: _Pen, d: _Pen) -> None:
    s.rect(0.18, 0.14, 0.5, 0.36, r=0.02)
    s.rect(0.26, 0.2, 0.58, 0.36, r=0.02)
    s.rect(0.08, 0.3, 0.9, 0.76, r=0.05)
    s.rect(0.64, 0.44, 0.95, 0.6, r=0.04)
    d.stroke([(0.26, 0.3), (0.26, 0.21), (0.27, 0.2), (0.57, 0.2), (0.58, 0.21), (0.58, 0.3)])
    d.stroke([(0.08, 0.3), (0.9, 0.3)])
    for dash in _dashes(_rrect_pts(0.11, 0.33, 0.87, 0.73, 0.03), 0.025, 0.015):
        d.stroke(dash, 0.8)
    d.frame(0.64, 0.44, 0.95, 0.6, r=0.04)
    d.dot(0.87, 0.52, 0.02)


@_shape("suitcase")
def _suitcase(s: _Pen, d: _Pen) -> None:
    s.rect(0.355, 0.13, 0.385, 0.29)
    s.rect(0.615, 0.13, 0.645, 0.29)
    s.rect(0.33, 0.09, 0.67, 0.15, r=0.03)
    s.ellipse(0.3, 0.9, 0.045, 0.045)
    s.ellipse(0.7, 0.9, 0.045, 0.045)
    s.rect(0.2, 0.28, 0.8, 0.88, r=0.06)
    for x in (0.32, 0.41, 0.5, 0.59, 0.68):
        d.stroke([(x, 0.33), (x, 0.83)])
    d.stroke([(0.2, 0.86), (0.8, 0.86)])


# --------------------------------------------------------------------------- electronics


def _app_grid(d: _Pen, x0: float, y0: float, cols: int, rows: int, step: float, sz: float) -> None:
    for i in range(cols):
        for j in range(rows):
            x, y = x0 + i * step, y0 + j * step
            d.rect(x, y, x + sz, y + sz, r=sz * 0.25)


@_shape("smartphone")
def _smartphone(s: _Pen, d: _Pen) -> None:
    s.rect(0.3, 0.07, 0.7, 0.93, r=0.06)
    d.frame(0.325, 0.11, 0.675, 0.89, r=0.035)
    d.stroke([(0.46, 0.09), (0.54, 0.09)])
    d.stroke([(0.44, 0.86), (0.56, 0.86)])
    _app_grid(d, 0.36, 0.16, 3, 4, 0.105, 0.07)


@_shape("tablet")
def _tablet(s: _Pen, d: _Pen) -> None:
    s.rect(0.2, 0.1, 0.8, 0.9, r=0.05)
    d.frame(0.235, 0.15, 0.765, 0.85, r=0.02)
    d.dot(0.5, 0.125, 0.008)
    _app_grid(d, 0.28, 0.2, 4, 5, 0.12, 0.06)


@_shape("laptop")
def _laptop(s: _Pen, d: _Pen) -> None:
    s.rect(0.16, 0.08, 0.84, 0.6, r=0.025)
    s.rect(0.16, 0.58, 0.84, 0.62)
    s.poly(_rounded([(0.14, 0.61), (0.86, 0.61), (0.96, 0.78), (0.04, 0.78)], 0.015))
    d.frame(0.19, 0.11, 0.81, 0.565, r=0.01)
    d.dot(0.5, 0.095, 0.006)
    d.stroke([(0.14, 0.615), (0.86, 0.615)])
    for y in (0.645, 0.675, 0.705):
        half = 0.36 + 0.1 * (y - 0.61) / 0.17
        x = 0.5 - half + 0.04
        while x + 0.03 < 0.5 + half - 0.04:
            d.stroke([(x, y), (x + 0.03, y)])
            x += 0.045
    d.closed([(0.42, 0.73), (0.58, 0.73), (0.59, 0.765), (0.41, 0.765)])


@_shape("headphones")
def _headphones(s: _Pen, d: _Pen) -> None:
    s.line(_arc(0.5, 0.52, 0.33, 0.4, 180, 360, 40), 0.06)
    s.rect(0.08, 0.46, 0.26, 0.84, r=0.07)
    s.rect(0.74, 0.46, 0.92, 0.84, r=0.07)
    d.stroke(_arc(0.5, 0.52, 0.33, 0.4, 215, 325, 30), 1.2)
    d.mstroke([(0.22, 0.52), (0.22, 0.78)], 1.2)
    d.ring(0.145, 0.65, 0.035, 0.07)
    d.ring(0.855, 0.65, 0.035, 0.07)


@_shape("speaker")
def _speaker(s: _Pen, d: _Pen) -> None:
    s.rect(0.25, 0.07, 0.75, 0.91, r=0.03)
    s.rect(0.3, 0.9, 0.36, 0.94, r=0.01)
    s.rect(0.64, 0.9, 0.7, 0.94, r=0.01)
    d.ring(0.5, 0.64, 0.17, 0.17, 1.3)
    d.ring(0.5, 0.64, 0.075, 0.075)
    d.dot(0.5, 0.64, 0.025)
    d.ring(0.5, 0.28, 0.085, 0.085, 1.3)
    d.dot(0.5, 0.28, 0.03)


@_shape("smartwatch")
def _smartwatch(s: _Pen, d: _Pen) -> None:
    s.poly(_rounded([(0.37, 0.04), (0.63, 0.04), (0.66, 0.3), (0.34, 0.3)], 0.03))
    s.poly(_rounded([(0.34, 0.7), (0.66, 0.7), (0.63, 0.96), (0.37, 0.96)], 0.03))
    s.rect(0.71, 0.42, 0.77, 0.54, r=0.015)
    s.rect(0.27, 0.26, 0.73, 0.74, r=0.11)
    d.frame(0.31, 0.3, 0.69, 0.7, r=0.08)
    d.ring(0.5, 0.5, 0.12, 0.12, 1.3)
    d.ring(0.5, 0.5, 0.075, 0.075, 1.3)
    for y in (0.8, 0.85, 0.9):
        d.dot(0.5, y, 0.01)
    d.stroke([(0.36, 0.27), (0.64, 0.27)])
    d.stroke([(0.36, 0.73), (0.64, 0.73)])


@_shape("camera")
def _camera(s: _Pen, d: _Pen) -> None:
    s.poly(_rounded([(0.33, 0.38), (0.39, 0.2), (0.61, 0.2), (0.67, 0.38)], 0.02))
    s.rect(0.15, 0.3, 0.27, 0.38, r=0.015)
    s.rect(0.05, 0.4, 0.1, 0.47, r=0.01)
    s.rect(0.9, 0.4, 0.95, 0.47, r=0.01)
    s.rect(0.08, 0.36, 0.92, 0.8, r=0.05)
    d.ring(0.5, 0.59, 0.18, 0.18, 1.4)
    d.ring(0.5, 0.59, 0.115, 0.115)
    d.stroke(_arc(0.5, 0.59, 0.075, 0.075, 200, 250), 1.2)
    d.frame(0.73, 0.41, 0.86, 0.48)
    d.stroke([(0.2, 0.42), (0.2, 0.76)])
    d.frame(0.44, 0.24, 0.56, 0.29)


# --------------------------------------------------------------------------- kitchen


@_shape("mug")
def _mug(s: _Pen, d: _Pen) -> None:
    s.ellipse(0.7, 0.52, 0.17, 0.2)
    s.ellipse(0.7, 0.52, 0.09, 0.12, fill=0)
    s.rect(0.16, 0.2, 0.68, 0.86, r=0.05)
    d.stroke([(0.16, 0.25), (0.68, 0.25)])
    d.stroke([(0.16, 0.81), (0.68, 0.81)])


@_shape("teapot")
def _teapot(s: _Pen, d: _Pen) -> None:
    s.ellipse(0.77, 0.58, 0.15, 0.17)
    s.ellipse(0.77, 0.58, 0.085, 0.11, fill=0)
    s.poly(
        _chain(
            _bez((0.32, 0.54), (0.24, 0.54), (0.18, 0.44), (0.12, 0.34)),
            [(0.07, 0.33)],
            _bez((0.09, 0.38), (0.16, 0.5), (0.22, 0.72), (0.34, 0.74)),
        )
    )
    s.ellipse(0.5, 0.6, 0.26, 0.22)
    s.rect(0.34, 0.76, 0.66, 0.84, r=0.02)
    s.poly(_arc(0.5, 0.41, 0.15, 0.1, 180, 360))
    s.ellipse(0.5, 0.3, 0.035, 0.03)
    d.stroke([(0.34, 0.41), (0.66, 0.41)])
    d.stroke(_bez((0.25, 0.6), (0.4, 0.67), (0.6, 0.67), (0.75, 0.6)))
    d.stroke([(0.34, 0.8), (0.66, 0.8)])


@_shape("plate")
def _plate(s: _Pen, d: _Pen) -> None:
    s.ellipse(0.5, 0.525, 0.42, 0.22)
    s.ellipse(0.5, 0.49, 0.42, 0.22)
    d.stroke(_arc(0.5, 0.49, 0.42, 0.22, 5, 175, 32))
    d.ring(0.5, 0.49, 0.28, 0.14)


@_shape("bowl")
def _bowl(s: _Pen, d: _Pen) -> None:
    s.ellipse(0.5, 0.36, 0.41, 0.1)
    s.poly(_arc(0.5, 0.36, 0.41, 0.4, 0, 180, 32))
    s.poly(_rounded([(0.38, 0.7), (0.62, 0.7), (0.64, 0.8), (0.36, 0.8)], 0.01))
    d.ring(0.5, 0.36, 0.38, 0.08)
    d.stroke(_arc(0.5, 0.36, 0.38, 0.28, 25, 155, 24))
    d.stroke([(0.38, 0.755), (0.62, 0.755)])


@_shape("bottle")
def _bottle(s: _Pen, d: _Pen) -> None:
    s.rect(0.42, 0.05, 0.58, 0.14, r=0.015)
    s.rect(0.44, 0.13, 0.56, 0.21)
    half = _chain(
        [(0.5, 0.2), (0.56, 0.2)],
        _bez((0.56, 0.2), (0.56, 0.27), (0.66, 0.28), (0.66, 0.36)),
        [(0.66, 0.48)],
        _bez((0.66, 0.48), (0.62, 0.53), (0.62, 0.61), (0.66, 0.66)),
        [(0.66, 0.88)],
        _bez((0.66, 0.88), (0.66, 0.92), (0.62, 0.93), (0.58, 0.93)),
        [(0.5, 0.93)],
    )
    s.poly(_sym(half))
    for x in (0.46, 0.5, 0.54):
        d.stroke([(x, 0.07), (x, 0.12)], 0.7)
    d.stroke([(0.44, 0.17), (0.56, 0.17)])
    d.stroke([(0.34, 0.4), (0.66, 0.4)])
    d.stroke([(0.34, 0.74), (0.66, 0.74)])
    d.stroke([(0.34, 0.86), (0.66, 0.86)])


# --------------------------------------------------------------------------- home


@_shape("chair")
def _chair(s: _Pen, d: _Pen) -> None:
    s.rect(0.28, 0.06, 0.72, 0.14, r=0.03)
    s.rect(0.28, 0.06, 0.34, 0.86)
    s.rect(0.66, 0.06, 0.72, 0.86)
    for x in (0.42, 0.5, 0.58):
        s.rect(x - 0.015, 0.12, x + 0.015, 0.48)
    s.poly([(0.28, 0.46), (0.72, 0.46), (0.78, 0.56), (0.22, 0.56)])
    s.rect(0.22, 0.56, 0.78, 0.61)
    leg = [(0.71, 0.6), (0.77, 0.6), (0.76, 0.93), (0.72, 0.93)]
    s.poly(leg)
    s.poly(_mx(leg))
    s.rect(0.26, 0.76, 0.74, 0.79)
    d.stroke([(0.22, 0.56), (0.78, 0.56)])
    d.stroke([(0.34, 0.14), (0.66, 0.14)])


@_shape("sofa")
def _sofa(s: _Pen, d: _Pen) -> None:
    s.rect(0.12, 0.26, 0.88, 0.6, r=0.06)
    s.rect(0.04, 0.42, 0.2, 0.8, r=0.06)
    s.rect(0.8, 0.42, 0.96, 0.8, r=0.06)
    s.rect(0.16, 0.56, 0.84, 0.8, r=0.03)
    s.rect(0.08, 0.79, 0.12, 0.87)
    s.rect(0.88, 0.79, 0.92, 0.87)
    d.frame(0.21, 0.31, 0.495, 0.57, r=0.04)
    d.frame(0.505, 0.31, 0.79, 0.57, r=0.04)
    d.stroke([(0.2, 0.6), (0.8, 0.6)])
    d.stroke([(0.5, 0.6), (0.5, 0.79)])
    d.mstroke([(0.2, 0.47), (0.2, 0.79)])


@_shape("table")
def _table(s: _Pen, d: _Pen) -> None:
    s.rect(0.04, 0.28, 0.96, 0.36, r=0.015)
    s.rect(0.09, 0.36, 0.91, 0.43)
    s.poly([(0.1, 0.36), (0.18, 0.36), (0.165, 0.82), (0.125, 0.82)])
    s.poly(_mx([(0.1, 0.36), (0.18, 0.36), (0.165, 0.82), (0.125, 0.82)]))
    d.stroke([(0.04, 0.36), (0.96, 0.36)])
    d.frame(0.4, 0.375, 0.6, 0.415)
    d.mstroke([(0.18, 0.43), (0.82, 0.43)])


@_shape("lamp")
def _lamp(s: _Pen, d: _Pen) -> None:
    s.poly(_rounded([(0.32, 0.08), (0.68, 0.08), (0.84, 0.44), (0.16, 0.44)], 0.02))
    s.rect(0.482, 0.44, 0.518, 0.82)
    s.poly(_arc(0.5, 0.9, 0.18, 0.1, 180, 360))
    s.rect(0.3, 0.88, 0.7, 0.92, r=0.01)
    d.stroke([(0.29, 0.12), (0.71, 0.12)])
    d.stroke([(0.17, 0.4), (0.83, 0.4)])
    for xt, xb in ((0.41, 0.37), (0.5, 0.5), (0.59, 0.63)):
        d.stroke([(xt, 0.13), (xb, 0.39)], 0.7)
    d.stroke([(0.32, 0.885), (0.68, 0.885)])


@_shape("vase")
def _vase(s: _Pen, d: _Pen) -> None:
    half = _chain(
        [(0.5, 0.07), (0.61, 0.07), (0.6, 0.11), (0.565, 0.13)],
        _bez((0.565, 0.13), (0.56, 0.3), (0.8, 0.36), (0.78, 0.6)),
        _bez((0.78, 0.6), (0.76, 0.78), (0.62, 0.82), (0.62, 0.88)),
        [(0.65, 0.93), (0.5, 0.93)],
    )
    s.poly(_sym(half))
    d.stroke([(0.4, 0.11), (0.6, 0.11)])
    d.stroke(_bez((0.15, 0.42), (0.4, 0.47), (0.6, 0.47), (0.85, 0.42)))
    d.stroke(_bez((0.15, 0.64), (0.4, 0.69), (0.6, 0.69), (0.85, 0.64)))
    zig = [
        (0.26 + i * 0.04, 0.515 + (0.06 if i % 2 else 0.0) + 0.015 * (1 - abs(6 - i) / 6))
        for i in range(13)
    ]
    d.stroke(zig, 0.8)
    d.stroke([(0.37, 0.88), (0.63, 0.88)])


@_shape("cushion")
def _cushion(s: _Pen, d: _Pen) -> None:
    def outline(a: float, b: float, pull: float) -> list[Point]:
        return _chain(
            _bez((a, a), (0.35, a + pull), (0.65, a + pull), (b, a)),
            _bez((b, a), (b - pull, 0.35), (b - pull, 0.65), (b, b)),
            _bez((b, b), (0.65, b - pull), (0.35, b - pull), (a, b)),
            _bez((a, b), (a + pull, 0.65), (a + pull, 0.35), (a, a)),
        )

    s.poly(outline(0.1, 0.9, 0.07))
    d.closed(outline(0.17, 0.83, 0.05))
    d.dot(0.5, 0.5, 0.02)
    for cx, cy in ((0.2, 0.2), (0.8, 0.2), (0.8, 0.8), (0.2, 0.8)):
        d.stroke([_lerp((cx, cy), (0.5, 0.5), 0.12), _lerp((cx, cy), (0.5, 0.5), 0.38)], 0.8)


@_shape("clock")
def _clock(s: _Pen, d: _Pen) -> None:
    s.poly(_arc(0.27, 0.25, 0.13, 0.13, 135, 315))
    s.poly(_arc(0.73, 0.25, 0.13, 0.13, 225, 405))
    s.rect(0.485, 0.13, 0.515, 0.24)
    s.ellipse(0.5, 0.13, 0.04, 0.03)
    s.line([(0.3, 0.8), (0.22, 0.93)], 0.05)
    s.line([(0.7, 0.8), (0.78, 0.93)], 0.05)
    s.ellipse(0.5, 0.56, 0.33, 0.33)
    d.ring(0.5, 0.56, 0.27, 0.27, 1.3)
    for i in range(12):
        a = math.radians(i * 30)
        r0 = 0.2 if i % 3 == 0 else 0.22
        d.stroke(
            [
                (0.5 + r0 * math.cos(a), 0.56 + r0 * math.sin(a)),
                (0.5 + 0.245 * math.cos(a), 0.56 + 0.245 * math.sin(a)),
            ]
        )
    d.stroke([(0.5, 0.56), (0.5, 0.39)], 1.6)
    d.stroke([(0.5, 0.56), (0.65, 0.64)], 1.2)
    d.dot(0.5, 0.56, 0.02)


# --------------------------------------------------------------------------- accessories


@_shape("cap")
def _cap(s: _Pen, d: _Pen) -> None:
    s.poly(
        _chain(
            _bez((0.1, 0.66), (0.06, 0.4), (0.22, 0.2), (0.44, 0.2)),
            _bez((0.44, 0.2), (0.64, 0.2), (0.74, 0.38), (0.74, 0.58)),
            _bez((0.74, 0.58), (0.84, 0.58), (0.92, 0.6), (0.95, 0.65)),
            _bez((0.95, 0.65), (0.92, 0.7), (0.8, 0.7), (0.7, 0.68)),
            _bez((0.7, 0.68), (0.5, 0.7), (0.3, 0.7), (0.1, 0.66)),
        )
    )
    s.ellipse(0.44, 0.2, 0.035, 0.02)
    d.stroke(_bez((0.44, 0.22), (0.36, 0.34), (0.3, 0.5), (0.3, 0.66)))
    d.stroke(_bez((0.44, 0.22), (0.54, 0.34), (0.58, 0.5), (0.56, 0.67)))
    d.stroke(_bez((0.09, 0.61), (0.3, 0.64), (0.55, 0.64), (0.74, 0.58)))
    d.stroke(_bez((0.75, 0.62), (0.84, 0.62), (0.9, 0.63), (0.92, 0.65)), 0.8)
    d.ring(0.3, 0.36, 0.015, 0.015, 0.8)
    d.ring(0.56, 0.36, 0.015, 0.015, 0.8)


@_shape("sunglasses")
def _sunglasses(s: _Pen, d: _Pen) -> None:
    lens = _rounded(
        [(0.06, 0.36), (0.45, 0.36), (0.43, 0.58), (0.36, 0.66), (0.14, 0.66), (0.08, 0.58)], 0.05
    )
    s.poly(lens)
    s.poly(_mx(lens))
    s.line([(0.04, 0.37), (0.96, 0.37)], 0.04)
    s.line(_bez((0.44, 0.42), (0.47, 0.38), (0.53, 0.38), (0.56, 0.42)), 0.03)
    s.rect(0.02, 0.35, 0.06, 0.42, r=0.01)
    s.rect(0.94, 0.35, 0.98, 0.42, r=0.01)
    inner = _scale(lens, 0.86, 0.255, 0.51)
    d.closed(inner)
    d.closed(_mx(inner))
    d.mstroke([(0.15, 0.57), (0.24, 0.44)], 1.3)
    d.mstroke([(0.2, 0.59), (0.27, 0.49)], 0.8)


@_shape("umbrella")
def _umbrella(s: _Pen, d: _Pen) -> None:
    joints = [0.92, 0.71, 0.5, 0.29, 0.08]
    canopy = _arc(0.5, 0.5, 0.42, 0.4, 180, 360)
    for xa, xb in itertools.pairwise(joints):
        canopy += _bez((xa, 0.5), ((xa + xb) / 2, 0.41), (xb, 0.5), n=8)[1:]
    s.poly(canopy)
    s.line([(0.5, 0.12), (0.5, 0.05)], 0.02)
    s.line([(0.5, 0.48), (0.5, 0.84)], 0.025)
    s.line(_arc(0.44, 0.84, 0.06, 0.06, 0, 180, 16), 0.025)
    for xb in joints[1:-1]:
        d.stroke(_bez((0.5, 0.11), (0.5 + (xb - 0.5) * 1.1, 0.2), (xb, 0.5)))


@_shape("perfume")
def _perfume(s: _Pen, d: _Pen) -> None:
    s.rect(0.36, 0.1, 0.64, 0.3, r=0.02)
    s.rect(0.4, 0.29, 0.6, 0.35, r=0.01)
    s.rect(0.44, 0.34, 0.56, 0.42)
    s.rect(0.2, 0.4, 0.8, 0.9, r=0.07)
    d.frame(0.25, 0.45, 0.75, 0.85, r=0.04)
    d.frame(0.34, 0.56, 0.66, 0.72)
    d.stroke([(0.36, 0.29), (0.64, 0.29)])
    d.mstroke([(0.42, 0.14), (0.42, 0.26)], 0.8)


# --------------------------------------------------------------------------- sport


@_shape("ball")
def _ball(s: _Pen, d: _Pen) -> None:
    s.ellipse(0.5, 0.5, 0.4, 0.4)
    d.stroke([(0.5, 0.08), (0.5, 0.92)], 1.2)
    d.stroke([(0.08, 0.5), (0.92, 0.5)], 1.2)
    d.ring(-0.12, 0.5, 0.39, 0.39, 1.2)
    d.ring(1.12, 0.5, 0.39, 0.39, 1.2)


@_shape("racket")
def _racket(s: _Pen, d: _Pen) -> None:
    cx, cy, rx, ry = 0.5, 0.32, 0.21, 0.24
    s.ellipse(cx, cy, 0.25, 0.28)
    s.poly([(0.38, 0.55), (0.62, 0.55), (0.535, 0.72), (0.465, 0.72)])
    s.poly([(0.45, 0.61), (0.55, 0.61), (0.5, 0.68)], fill=0)
    s.rect(0.455, 0.7, 0.545, 0.96, r=0.015)
    d.ring(cx, cy, rx, ry, 1.2)
    for i in range(-4, 5):
        t = i * 0.045
        h = math.sqrt(max(0.0, 1 - (t / rx) ** 2))
        d.stroke([(cx + t, cy - ry * h), (cx + t, cy + ry * h)], 0.7)
        v = i * 0.05
        w = math.sqrt(max(0.0, 1 - (v / ry) ** 2))
        d.stroke([(cx - rx * w, cy + v), (cx + rx * w, cy + v)], 0.7)
    for i in range(5):
        y = 0.77 + i * 0.035
        d.stroke([(0.455, y), (0.545, y - 0.025)], 0.8)


@_shape("dumbbell")
def _dumbbell(s: _Pen, d: _Pen) -> None:
    s.rect(0.1, 0.47, 0.9, 0.53)
    for x0, x1, h in ((0.2, 0.28, 0.25), (0.13, 0.2, 0.19)):
        s.rect(x0, 0.5 - h, x1, 0.5 + h, r=0.02)
        s.rect(1 - x1, 0.5 - h, 1 - x0, 0.5 + h, r=0.02)
    s.rect(0.08, 0.455, 0.13, 0.545, r=0.01)
    s.rect(0.87, 0.455, 0.92, 0.545, r=0.01)
    s.rect(0.36, 0.455, 0.64, 0.545, r=0.02)
    for i in range(8):
        x = 0.39 + i * 0.031
        d.stroke([(x, 0.47), (x, 0.53)], 0.6)
    d.mstroke([(0.2, 0.32), (0.2, 0.68)])
    d.mstroke([(0.24, 0.28), (0.24, 0.72)], 0.7)


# --------------------------------------------------------------------------- public API

SHAPE_NAMES: tuple[str, ...] = tuple(sorted(_SHAPES))


def _supersample(size: int) -> int:
    # Keep the supersampled canvas at most ~2k px so large sizes stay cheap.
    return 4 if size <= 256 else 2 if size <= 1024 else 1


@functools.lru_cache(maxsize=1024)
def _render(shape: str, size: int) -> tuple[Image.Image, Image.Image]:
    sil_pen, det_pen = _Pen(), _Pen()
    _SHAPES[shape](sil_pen, det_pen)
    x0, y0, x1, y1 = sil_pen.bounds
    side = max(x1 - x0, y1 - y0) / _FILL
    ss = _supersample(size)
    canvas = size * ss
    stroke = max(1, round(size / 64)) * ss
    xf = _Xf((x0 + x1 - side) / 2, (y0 + y1 - side) / 2, canvas / side, stroke, ss)
    sil, det = Image.new("L", (canvas, canvas), 0), Image.new("L", (canvas, canvas), 0)
    sil_pen.render(sil, xf)
    det_pen.render(det, xf)
    if ss > 1:
        # Integer box reduction is both the anti-aliasing filter and much faster than resize().
        sil, det = sil.reduce(ss), det.reduce(ss)
    return sil, ImageChops.darker(det, sil)


def _check(shape: str, size: int) -> None:
    if shape not in _SHAPES:
        raise KeyError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPE_NAMES)}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")


def shape_mask(shape: str, size: int) -> Image.Image:
    """Mode "L" size x size mask: 255 inside the centred product silhouette, 0 outside.

    The silhouette's bounding box spans ~76% of the canvas on its larger side. Results are
    cached; a fresh copy is returned so callers may mutate it.
    """
    _check(shape, size)
    return _render(shape, size)[0].copy()


def detail_mask(shape: str, size: int) -> Image.Image:
    """Mode "L" size x size mask: 255 on internal detail strokes, 0 elsewhere.

    Strokes (seams, collars, buttons, screens, ...) are clipped to the silhouette and are about
    max(1, round(size / 64)) px wide. Cached; a fresh copy is returned.
    """
    _check(shape, size)
    return _render(shape, size)[1].copy()
