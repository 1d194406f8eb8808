"""moon2 report: a real (tiny) demo folder made by the project's own stages -> one page whose
sections are all there and whose every image decodes in a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moon2.errors import InputError
from moon2.report import ReportResult, build_report
from moon2.report.build import PLOT_FILES, SECTIONS, expert_usage
from moon2.report.collect import query_noise_labels
from moon2.report.retrieval import choose_examples, read_rankings, run_lines
from tests.factories import png_bytes, product_row, products_table

CHROMIUM_TIMEOUT = 120


@pytest.fixture(scope="module")
def demo(demo_dir: Path) -> Path:
    """The session's ``moon2 demo`` folder (conftest.demo_dir): every stage's real output."""
    return demo_dir


@pytest.fixture(scope="module")
def report(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> ReportResult:
    # a folder of its own: the demo's report/ belongs to the session's demo fixture
    return build_report(demo, tmp_path_factory.mktemp("report"))


def test_demo_report_has_every_section_and_plot(demo: Path, report: ReportResult) -> None:
    assert report.sections == {name: "ok" for name, _ in SECTIONS}
    assert report.html == report.out_dir / "index.html"
    assert build_report(demo).out_dir == demo / "report"  # the default place
    assert sorted(p.name for p in report.plots) == sorted(PLOT_FILES)
    for path in report.plots:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 150
    text = report.html.read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "not available" not in text
    assert len(text) < 5_000_000
    # the page is rebuilt in place: nothing is left of a temporary file
    written = sorted(p.name for p in report.out_dir.iterdir() if not p.name.startswith("."))
    assert written == sorted(["index.html", *PLOT_FILES])


class _Dom(HTMLParser):
    """What the test reads from the DOM Chromium dumps after running the page's script."""

    def __init__(self) -> None:
        super().__init__()
        self.root: dict[str, str | None] = {}
        self.headings: list[str] = []
        self.plot_alts: list[str] = []
        self.correct_cards = 0
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        classes = (values.get("class") or "").split()
        if tag == "html":
            self.root = values
        elif tag == "h2":
            self._in_h2 = True
            self.headings.append("")
        elif tag == "img" and "plot" in classes:
            self.plot_alts.append(values.get("alt") or "")
        elif tag == "div" and "result" in classes and "correct" in classes:
            self.correct_cards += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headings[-1] += data


def _chromium(binary: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *arguments,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, check=False
    )


def test_every_image_decodes_in_headless_chromium(report: ReportResult, tmp_path: Path) -> None:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium is not installed (Debian package chromium), cannot render the page")
    url = report.html.resolve().as_uri()
    dumped = _chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = _Dom()
    dom.feed(dumped.stdout)
    total = int(dom.root["data-images-total"] or 0)
    assert dom.root["data-images-ok"] == dom.root["data-images-total"]
    # 6 plots, product thumbnails before and after augmentation, queries and their top 5
    assert total >= 40
    assert [h.strip() for h in dom.headings] == [heading for _, heading in SECTIONS]
    assert len(dom.plot_alts) == len(PLOT_FILES)
    assert dom.correct_cards >= 3  # every query shows its correct product, marked
    assert f"{total} of {total} images decoded" in dumped.stdout

    shot = tmp_path / "shot.png"
    taken = _chromium(
        binary,
        tmp_path / "profile-shot",
        f"--screenshot={shot}",
        "--window-size=1200,3000",
        "--hide-scrollbars",
        url,
    )
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 20  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # plots and photos drawn


def test_train_run_alone_says_what_is_missing(demo: Path, tmp_path: Path) -> None:
    alone = build_report(demo / "run", tmp_path / "alone")
    assert alone.sections["curves"] == alone.sections["experts"] == "ok"
    missing = {name: state for name, state in alone.sections.items() if state != "ok"}
    assert set(missing) == {"metrics", "filter", "augmentation", "retrieval"}
    assert not any(state.startswith("could not be built") for state in missing.values())
    assert "no eval results found" in missing["metrics"]
    assert "no moon2 filter output" in missing["filter"]
    text = alone.html.read_text(encoding="utf-8")
    for reason in missing.values():
        assert f"not available: {reason}" in text
    # the run's own copy of its training queries still tells which of them were noisy
    assert {p.name for p in alone.plots} == {
        "loss.png",
        "omega.png",
        "lr.png",
        "experts.png",
        "train_margins.png",
    }
    assert "injected noise" in text

    # siblings are used when named, and an eval names its benchmark itself
    joined = build_report(demo / "run", tmp_path / "joined", eval_dir=demo / "eval")
    assert joined.sections["metrics"] == joined.sections["retrieval"] == "ok"
    assert joined.sections["filter"] != "ok"

    with pytest.raises(InputError, match="nowhere"):
        build_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty is neither a moon2 demo"):
        build_report(tmp_path / "empty")
    with pytest.raises(InputError, match="eval_dir"):
        build_report(demo / "run", tmp_path / "x", eval_dir=tmp_path / "missing")


def test_noise_labels_rankings_and_usage_by_hand(tmp_path: Path) -> None:
    queries = pl.DataFrame(
        {
            "query_id": ["q1", "q2", "q3"],
            "positive_id": ["p1", "p9", None],
            "truth_positive_id": ["p1", "p2", "p3"],
        }
    )
    assert query_noise_labels(queries).to_list() == [False, True, None]
    flagged = queries.with_columns(truth_is_noisy=pl.Series([True, False, False]))
    assert query_noise_labels(flagged).to_list() == [True, False, False]  # the flag wins
    assert query_noise_labels(queries.select("query_id", "positive_id")) is None

    run = [
        "a%20b Q0 p7 1 0.9 m",  # trec_id escaped "a b"
        "a%20b Q0 p3 2 0.8 m",
        "q2 Q0 p1 1 0.7 m",
        "q2 Q0 p2 2 0.6 m",
        "q2 Q0 p3 3 0.5 m",
        "q2 Q0 p4 4 0.4 m",
        "q2 Q0 p5 5 0.3 m",
        "q2 Q0 x%25y 6 0.2 m",  # the correct one, past the top 5
        "q3 Q0 p1 1 0.9 m",
        "skipped Q0 p1 1 0.9 m",
        "garbage",
    ]
    relevant = {"a b": {"p3"}, "q2": {"x%y"}, "q3": {"p1"}, "q4": {"p1"}}
    rankings = read_rankings(run, relevant)
    # the same from a file: only the lines of the asked queries are kept
    (tmp_path / "t2mm.trec").write_text("\n".join(run) + "\n")
    kept = run_lines(tmp_path / "t2mm.trec", relevant)
    assert kept == [line for line in run if line.split()[0] in {"a%20b", "q2", "q3"}]
    assert read_rankings(kept, relevant) == rankings
    assert set(rankings) == {"a b", "q2", "q3"}
    assert rankings["a b"].hit and rankings["a b"].correct_rank == 2
    assert [c for c, _, _ in rankings["a b"].top] == ["p7", "p3"]
    assert not rankings["q2"].hit and rankings["q2"].correct_rank == 6
    assert rankings["q2"].correct_id == "x%y" and len(rankings["q2"].top) == 5
    assert rankings["q2"].depth == 6
    chosen = choose_examples(rankings, 3)
    assert [r.query_id for r in chosen] == ["a b", "q2", "q3"]  # hit, miss, hit
    assert [r.query_id for r in choose_examples(rankings, 1)] == ["a b"]

    records = [
        {"step": 1, "epoch": 0, "usage_text": [1.0, 0.0]},
        {"step": 2, "epoch": 1, "usage_text": [0.5, 0.5], "usage_image": [0.2, 0.8]},
        {"step": 3, "epoch": 1, "usage_text": [0.3, 0.7], "usage_image": [0.4, 0.6]},
    ]
    usage, epoch, count = expert_usage(records)
    assert (epoch, count) == (1, 2)
    np.testing.assert_allclose(usage["text"], [0.4, 0.6])
    np.testing.assert_allclose(usage["image"], [0.3, 0.7])
    assert expert_usage([{"step": 1, "epoch": 0, "loss": 1.0}]) == ({}, -1, 0)


def test_messy_rows_are_escaped_and_never_make_a_broken_image(tmp_path: Path) -> None:
    """Markup in titles, empty titles, no images, remote, missing and relative image paths."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(png_bytes((10, 200, 10), size=300))
    rows = [
        product_row("p<1>", title='<script>alert("x")</script> & 包邮', category=list("ABCDEFG")),
        product_row("p2", title="", images=None, category=None),
        product_row("p3", images=[{"bytes": None, "path": "https://example.com/a.jpg"}]),
        product_row("p4", images=[{"bytes": None, "path": "../../../photos/a.png"}]),
        product_row("p5", images=[{"bytes": None, "path": "missing.png"}, None]),
    ]
    table = products_table(rows)
    augmented = [
        {"bytes": png_bytes((0, 0, 255)), "path": None},
        {"bytes": b"not an image", "path": None},
    ]
    table = table.append_column("aug_title", pa.array([f"clean title {i}" for i in range(5)]))
    table = table.append_column(
        "aug_images", pa.array([augmented, None, [], augmented[:1], None], table["images"].type)
    )
    (tmp_path / "demo" / "aug" / "products").mkdir(parents=True)
    pq.write_table(table, tmp_path / "demo" / "aug" / "products" / "part-0.parquet")

    result = build_report(tmp_path / "demo", examples=5)
    assert result.sections["augmentation"] == "ok"
    for name, state in result.sections.items():
        if name != "augmentation":
            assert state != "ok" and not state.startswith("could not be built"), (name, state)
    text = result.html.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "&lt;script&gt;alert(&quot;x&quot;)" in text
    assert "包邮" in text and "A &gt; B &gt; C &gt; D &gt; E &gt; F &gt; G" in text
    assert not re.search(r"""src\s*=\s*["']?\s*(?:https?:)?//""", text)
    assert "image is remote" in text and "does not exist" in text  # said, not drawn
    assert "not a recognised image format" in text
    # the readable images (p<1>'s photo and first aug image, p4's relative path and aug image)
    # are small inline JPEGs; every other cell is a box that says why
    sources = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', text)
    assert len(sources) == 4 and text.count("<img ") == 4
    for source in sources:
        with Image.open(io.BytesIO(base64.b64decode(source))) as image:
            assert max(image.size) <= 112
