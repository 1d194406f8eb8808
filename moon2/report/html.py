"""The HTML of the report: one self-contained page (inline CSS, images as ``data:`` URIs).

Everything that comes from the data is escaped here: a value becomes markup only by going
through :func:`esc` or by being built as :class:`Html` by this module's helpers. The page
loads nothing from anywhere (no CDN, no font, no remote image), so it opens offline, from an
e-mail attachment or a CI artifact alike.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moon2.data.images import decode_image
from moon2.errors import ImageDecodeError

THUMB_SIZE = 112
"""Longest side of a thumbnail in pixels: enough to recognise a product, small enough that a
page of a hundred of them stays well under a megabyte."""


class Html(str):
    """A string that is already markup (built by this module): not escaped again."""


def esc(value: Any) -> Html:
    """``value`` as text in the page: markup escaped, None as an empty string."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[Any]) -> Html:
    return Html("".join(esc(part) for part in parts))


def tag(name: str, content: Any = "", **attributes: Any) -> Html:
    """``<name attr="...">content</name>``; attribute names use ``_`` for ``-`` and a trailing
    ``_`` for Python keywords (``class_``); None attributes are left out."""
    rendered = "".join(
        f' {key.rstrip("_").replace("_", "-")}="{esc(value)}"'
        for key, value in attributes.items()
        if value is not None
    )
    return Html(f"<{name}{rendered}>{esc(content)}</{name}>")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(uri: str, alt: str, class_: str | None = None, title: str | None = None) -> Html:
    return Html(
        f'<img src="{esc(uri)}" alt="{esc(alt)}"'
        + (f' class="{esc(class_)}"' if class_ else "")
        + (f' title="{esc(title)}"' if title else "")
        + ">"
    )


def thumbnail_uri(
    cell: dict[str, Any] | None, base_dir: Path | None, size: int = THUMB_SIZE
) -> tuple[str | None, str | None]:
    """(``data:`` URI of a small JPEG of the image, None) or (None, why it cannot be shown).

    The photo is decoded at reduced scale where the format allows it and re-encoded small, so
    a catalog of 4000-pixel photos makes a page of kilobyte thumbnails.
    """
    if not cell:
        return None, "no image"
    try:
        image = decode_image(cell, base_dir=base_dir, draft_size=size * 2)
    except ImageDecodeError as exc:
        return None, str(exc)
    except (OSError, ValueError) as exc:  # PIL on a file it opened but cannot convert
        return None, f"image cannot be converted ({exc})"
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return data_uri(buffer.getvalue(), "image/jpeg"), None


def thumb(
    cell: dict[str, Any] | None,
    base_dir: Path | None,
    alt: str,
    class_: str = "thumb",
    caption: str | None = None,
) -> Html:
    """A thumbnail, or a grey box saying why there is none (never a broken ``<img>``)."""
    uri, problem = thumbnail_uri(cell, base_dir)
    if uri is None:
        body = tag("div", problem or "no image", class_="noimg", title=problem)
    else:
        body = img(uri, alt, class_=class_)
    if caption is None:
        return body
    return tag("figure", join([body, tag("figcaption", caption)]), class_="fig")


def table(
    headers: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    class_: str = "data",
    numeric_from: int = 1,
) -> Html:
    """A table; cells from column ``numeric_from`` on are right-aligned (numbers)."""
    head = tag("tr", join(tag("th", h) for h in headers))
    body = []
    for row in rows:
        cells = [
            tag("td", value, class_="num" if i >= numeric_from else None)
            for i, value in enumerate(row)
        ]
        body.append(tag("tr", join(cells)))
    return tag("table", join([tag("thead", head), tag("tbody", join(body))]), class_=class_)


def note(text: Any, class_: str = "note") -> Html:
    return tag("p", text, class_=class_)


def missing(reason: str) -> Html:
    """The visible mark of a section without its inputs."""
    return tag("p", f"not available: {reason}", class_="missing")


@dataclass
class Section:
    """One section of the page: its body, "ok" or why its inputs are missing, and the PNG
    plots (file name -> bytes) it shows, which are also written next to the page."""

    body: Html
    status: str = "ok"
    plots: dict[str, bytes] = field(default_factory=dict)


def unavailable(reason: str, body: Html | None = None) -> Section:
    """A section whose inputs are missing: the visible note, then whatever it could show."""
    return Section(join([missing(reason), body or Html("")]), reason)


def plot(uri: str, alt: str) -> Html:
    return tag("div", img(uri, alt, class_="plot"), class_="plotbox")


CSS = """
:root { --ok: #1a8f3c; --bad: #c0392b; --muted: #666; --line: #ddd; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", sans-serif;
  margin: 0; color: #222; background: #fafafa; }
header { background: #23395d; color: #fff; padding: 16px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .sub { color: #cfd8e6; font-size: 13px; word-break: break-all; }
nav { padding: 8px 28px; background: #e9eef5; border-bottom: 1px solid var(--line);
  display: flex; flex-wrap: wrap; gap: 4px 14px; }
nav a { color: #23395d; text-decoration: none; white-space: nowrap; }
nav a.off { color: #999; }
main { padding: 8px 28px 28px; max-width: 1400px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px;
  margin: 18px 0; padding: 6px 20px 16px; }
h2 { font-size: 19px; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
table.data { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
table.data th, table.data td { border: 1px solid var(--line); padding: 3px 9px; }
table.data th { background: #f0f3f7; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.missing { color: var(--bad); font-weight: 600; background: #fdf0ee; padding: 8px 12px;
  border-left: 4px solid var(--bad); }
p.note { color: var(--muted); font-size: 13px; }
.plotbox { margin: 8px 0 14px; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
img.thumb { width: 96px; height: 96px; object-fit: contain; background: #fff;
  border: 1px solid var(--line); display: block; }
.noimg { width: 96px; height: 96px; display: flex; align-items: center; justify-content: center;
  text-align: center; font-size: 11px; color: var(--muted); background: #eee;
  border: 1px dashed #bbb; overflow: hidden; padding: 4px; }
figure.fig { margin: 0; display: inline-block; vertical-align: top; width: 104px; }
figure.fig figcaption { font-size: 11px; color: var(--muted); word-break: break-word; }
.row { display: flex; gap: 6px; flex-wrap: wrap; align-items: flex-start; }
.aug { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; border-top: 1px solid var(--line);
  padding: 10px 0; }
.aug .side h4 { margin: 0 0 4px; font-size: 12px; color: var(--muted); text-transform: uppercase; }
.aug .title { font-size: 14px; margin-bottom: 6px; word-break: break-word; }
.meta { font-size: 12px; color: var(--muted); word-break: break-all; }
.query { border-top: 1px solid var(--line); padding: 10px 0; }
.query .qhead { margin-bottom: 6px; }
.query .qtext { font-weight: 600; }
.tag { display: inline-block; font-size: 11px; padding: 1px 7px; border-radius: 9px;
  margin-left: 6px; color: #fff; }
.tag.hit { background: var(--ok); } .tag.miss { background: var(--bad); }
.tag.noise { background: #b9770e; }
.results { display: flex; gap: 8px; flex-wrap: wrap; }
.result { width: 132px; border: 3px solid var(--line); border-radius: 6px; padding: 5px;
  background: #fff; font-size: 12px; }
.result.correct { border-color: var(--ok); background: #eefaf1; }
.result .rank { font-weight: 700; }
.result .mark { color: var(--ok); font-weight: 700; }
.result .ttl { word-break: break-word; max-height: 5.8em; overflow: hidden; }
.result img.thumb, .result .noimg { margin: 3px auto; }
footer { color: var(--muted); font-size: 12px; padding: 10px 28px 30px; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, ok = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { ok++; }
  }
  document.documentElement.dataset.imagesTotal = String(images.length);
  document.documentElement.dataset.imagesOk = String(ok);
  var out = document.getElementById("image-count");
  if (out) {
    out.textContent = ok + " of " + images.length + " images decoded" +
      (ok === images.length ? "" : " (" + (images.length - ok) + " broken)");
  }
});
"""


def page(
    title: str,
    subtitle: str,
    sections: Sequence[tuple[str, str, Html, bool]],
    footer: str,
) -> str:
    """The whole document; ``sections`` are (anchor, heading, body, available)."""
    nav = join(
        tag("a", heading, href=f"#{anchor}", class_=None if available else "off")
        for anchor, heading, _, available in sections
    )
    body = join(
        tag("section", join([tag("h2", heading), content]), id=anchor)
        for anchor, heading, content, _ in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<header><h1>{esc(title)}</h1><div class="sub">{esc(subtitle)}</div></header>\n'
        f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n"
        f'<footer>{esc(footer)} &middot; <span id="image-count">images not counted yet '
        "(scripts disabled?)</span></footer>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
