import json
from html.parser import HTMLParser

import pytest

import pnnh
from pnnh.errors import PnnhError
from pnnh.report import build_report


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.captions, self.headings = [], 0, [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag == "table":
            self.tables += 1
        if tag in ("figcaption", "h2", "caption"):
            self._in = tag

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "figcaption":
            self.captions.append(data)
        if self._in == "h2":
            self.headings.append(data)


def parse(path):
    c = _Collector()
    c.feed(path.read_text())
    return c


def test_report_embeds_every_figure_and_table(tmp_path):
    root = tmp_path / "study"
    pnnh.train({"model": "plain_mlp", "depth": 4, "width": 16, "epochs": 2, "num_samples": 300,
                "out": str(root / "a"), "progress": False})
    pnnh.train({"model": "resnet_mlp", "depth": 4, "width": 16, "epochs": 1, "num_samples": 300,
                "out": str(root / "b"), "progress": False})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    (root / "probes").mkdir()
    fig.savefig(root / "probes" / "extra.png")
    plt.close(fig)
    (root / "probes" / "numbers.csv").write_text("layer,value\nblocks.0,0.5\nblocks.1,0.25\n")
    (root / "report.json").write_text(json.dumps({"title": "My <study>", "intro": "Hello & bye"}))

    path = build_report(root)
    assert path == root / "report.html"
    doc = parse(path)
    assert len(doc.images) == 2  # generated training curves + the probe figure
    assert all(img["src"].startswith("data:image/png;base64,") for img in doc.images)
    assert "probes/extra.png" in doc.captions
    # accuracy table, csv table, software versions (+ nothing linked from outside)
    assert doc.tables == 3
    assert {"Accuracy", "Figures", "Tables", "Run configurations", "Software"} <= set(doc.headings)
    text = path.read_text()
    assert "My &lt;study&gt;" in text and "Hello &amp; bye" in text
    assert "src='http" not in text and 'src="http' not in text
    assert "torch" in text and pnnh.__version__ in text
    md = (root / "report.md").read_text()
    assert "| a | plain_mlp | 4 |" in md and "| b | resnet_mlp | 4 |" in md


def test_report_errors(tmp_path):
    with pytest.raises(PnnhError, match="directory not found"):
        build_report(tmp_path / "missing")
    with pytest.raises(PnnhError, match="nothing to report"):
        build_report(tmp_path)
