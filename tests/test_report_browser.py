"""``selfsight report``: one self-contained HTML page (images as data URIs, text escaped) that
renders in a real browser: headless Chromium loads it, its images decode (naturalWidth > 0,
checked by a probe script in a copy of the page) and its screenshot is not blank. The browser
test is skipped only when Chromium is absent (scripts/install.sh --test installs Debian's)."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from selfsight.data import ArrayDataset
from selfsight.engine.trainer import pretrain
from selfsight.report import save_eval, write_report
from selfsight.resolve import load_config
from selfsight.viz.pictures import write_pictures

CHROMIUM = shutil.which("chromium")
NASTY = "<script>alert('x')</script> & \"quotes\""


@pytest.fixture(scope="module")
def report(tmp_path_factory, fmnist_small, fmnist_test):
    """A tiny trained run with its pictures, a real kNN result, health metrics measured here, and
    one result whose text tries to inject markup; -> (run folder, report path)."""
    from helpers import tiny_overrides

    from selfsight.backbones.features import backbone_features
    from selfsight.eval.features import extract
    from selfsight.eval.knn import knn_accuracy
    from selfsight.runs import load_run
    run = tmp_path_factory.mktemp("report") / "simclr-run"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 4, "train.log_every": 1})), run, dataset=fmnist_small)
    test = ArrayDataset(fmnist_test.images[:500].clone(), fmnist_test.labels[:500].clone(), classes=fmnist_test.classes)
    write_pictures(run, data=test, n=160)
    model, _, pre = load_run(run)
    fn = backbone_features(model.backbone)
    bank, bank_y = extract(fn, fmnist_small, pre)
    feats, y = extract(fn, test, pre)
    save_eval(run, "knn", {"model": "trained", "method": "simclr", "backbone": "resnet10", "train": "fmnist-2k",
                           "test": "fashion-mnist:test[:500]", "features": "cls", "k": 20, "temperature": 0.07,
                           **knn_accuracy(bank, bank_y, feats, y, 20, 0.07)})
    s = torch.linalg.svdvals(feats)
    p = s / s.sum() + 1e-7
    rankme = float(torch.exp(-(p * p.log()).sum()))                    # Garrido et al. 2023, Eq. 1
    std = float(torch.nn.functional.normalize(feats, dim=1).std(0).mean())
    save_eval(run, "health", {"model": "trained", "data": "fashion-mnist:test", "rankme": rankme, "embedding_std": std})
    (run / "eval" / "knn_random.json").write_text(json.dumps({"model": "random", "test": NASTY, "top1": 0.5}))
    return run, write_report(run)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_is_one_self_contained_escaped_page(report):
    run, path = report
    assert path == run / "report.html"
    text = path.read_text()
    parser = _Tags()
    parser.feed(text)
    imgs = [a for t, a in parser.tags if t == "img"]
    names = {p.stem for p in (run / "pictures").glob("*.png") if not p.stem.startswith("curve_")}
    curves = {p.stem for p in (run / "pictures").glob("curve_*.png")}
    assert len(imgs) == len(names) + len(curves) and {"embedding_pca", "retrieval"} <= names
    for a in imgs:                                              # every image embedded and a valid PNG
        assert a["src"].startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1]))).verify()
    assert not [a for t, a in parser.tags if t in ("link", "script", "iframe")]      # no external resources
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text)
    assert NASTY not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in text
    knn = json.loads((run / "eval" / "knn.json").read_text())
    assert f"{knn['top1']:.4f}" in text and "rankme" in text                     # evaluation and health tables
    assert "simclr" in text and "resnet10" in text and "optim:" in text          # overview and config


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, path = report
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    # 1) a copy of the page with a probe that, once loaded, writes what the browser decoded into the DOM
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load',function(){var im=Array.from(document.images);"
              "var d=document.createElement('div');d.id='probe';"
              "d.setAttribute('data-images',im.length);"
              "d.setAttribute('data-decoded',im.filter(function(i){return i.complete&&i.naturalWidth>0;}).length);"
              "d.setAttribute('data-widths',im.map(function(i){return i.naturalWidth;}).join(','));"
              "d.setAttribute('data-tables',document.querySelectorAll('table').length);"
              "d.setAttribute('data-rows',document.querySelectorAll('tbody tr').length);"
              "document.body.appendChild(d);});</script>")
    probe.write_text(path.read_text().replace("</body>", script + "</body>"))
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(flags + ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=120, env=env)
    m = re.search(r'<div id="probe"([^>]*)>', dom.stdout)
    assert m, (dom.returncode, dom.stderr[-2000:])
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', m.group(1)))
    widths = [int(w) for w in attrs["widths"].split(",")]
    expected = [Image.open(io.BytesIO(base64.b64decode(src))).width
                for src in re.findall(r'src="data:image/png;base64,([^"]+)"', path.read_text())]
    assert int(attrs["images"]) == len(expected) >= 8 and int(attrs["decoded"]) == len(expected)
    assert widths == expected                                       # each image decoded at its own size
    assert int(attrs["tables"]) >= 3 and int(attrs["rows"]) >= 4     # overview, evaluation (2), health
    # 2) a screenshot of the page itself: not blank, with the charts' colours in it
    shot = tmp_path / "report.png"
    res = subprocess.run(flags + ["--window-size=1280,2000", f"--screenshot={shot}", path.as_uri()],
                         capture_output=True, text=True, timeout=120, env=env)
    assert shot.exists(), (res.returncode, res.stderr[-2000:])
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (2000, 1280, 3)
    assert img.std() > 25
    assert (img.sum(-1) < 600).mean() > 0.15                        # a good share of the page is not white
    tab_blue = (np.abs(img - np.array([31, 119, 180])).sum(-1) <= 6).sum()
    assert tab_blue > 200                                           # dots of the embedding map / curve lines
    shutil.copy(shot, os.environ.get("SELFSIGHT_REPORT_SCREENSHOT", tmp_path / "kept.png"))
