"""A run at a glance: ``selfsight report RUN`` (one self-contained HTML page) and ``selfsight
compare RUN RUN ...`` (a table of runs side by side).

What a run folder holds and where each part of the page comes from:

- ``config.yaml``: the resolved config (method, backbone, the whole recipe);
- ``metrics.jsonl``: the training log (curves, budget, images/s);
- ``eval/*.json``: evaluation results, one JSON object each, as ``selfsight eval PROTOCOL ...
  --json`` prints them (``--save`` writes them there as ``eval/PROTOCOL[_BASELINE].json``);
  the protocol is the object's ``protocol`` key, else the file name up to the first ``_``
  (``knn``, ``linear``, ``finetune``, ``health``);
- ``pictures/*.png``: written by the trainer (MIM masks) and by ``selfsight pictures``.

The page embeds every image as a base64 data URI and its CSS inline: no external resources.
Every piece of text from the run is escaped with ``html.escape``.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from pathlib import Path

import yaml

from selfsight.files import safe_load
from selfsight.viz.pictures import curves, read_metrics

EVAL_DIR = "eval"
PROTOCOLS = ("knn", "linear", "finetune", "health")


def _run_dir(run: str | Path) -> Path:
    p = Path(run)
    if not p.exists():
        raise ValueError(f"no run at {p}")
    d = p if p.is_dir() else p.parent
    if not any((d / f).exists() for f in ("config.yaml", "metrics.jsonl", "checkpoint.pt")):
        raise ValueError(f"{d} is not a selfsight run (no config.yaml, metrics.jsonl or checkpoint.pt)")
    return d


# ---- evaluation results ------------------------------------------------------------------------
def save_eval(run: str | Path, protocol: str, result: dict) -> Path:
    """Write ``result`` to ``RUN/eval/PROTOCOL[_BASELINE].json`` (with a ``protocol`` key)."""
    model = result.get("model", "trained")
    path = _run_dir(run) / EVAL_DIR / (f"{protocol}.json" if model in ("trained", None) else f"{protocol}_{model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"protocol": protocol, **result}, indent=1))
    tmp.replace(path)
    return path


def read_evals(run: str | Path) -> list[dict]:
    """Every JSON object in ``RUN/eval/*.json`` with ``protocol`` and ``file`` set (unreadable
    files are skipped)."""
    rows = []
    for path in sorted((_run_dir(run) / EVAL_DIR).glob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(obj, dict):
            obj.setdefault("protocol", path.stem.split("_")[0])
            obj["file"] = path.name
            rows.append(obj)
    return rows


def _result(evals: list[dict], protocol: str) -> dict | None:
    """The saved result of the trained backbone under ``protocol`` (the most recent file when several)."""
    rows = [r for r in evals if r["protocol"] == protocol and r.get("model", "trained") == "trained"
            and isinstance(r.get("top1"), (int, float))]
    return rows[-1] if rows else None


def _score(evals: list[dict], protocol: str) -> float | None:
    """Top-1 of the trained backbone under ``protocol``."""
    r = _result(evals, protocol)
    return float(r["top1"]) if r else None


def _test_data(evals: list[dict], protocol: str) -> str | None:
    """The test data of that result (a folder by its name)."""
    r = _result(evals, protocol)
    test = r.get("test") if r else None
    return Path(str(test).rstrip("/")).name if test and ("/" in str(test) or Path(str(test)).is_dir()) else test


# ---- one run's summary ---------------------------------------------------------------------------
def read_config(run: str | Path) -> dict:
    """``RUN/config.yaml`` as a nested dict ({} when absent)."""
    path = _run_dir(run) / "config.yaml"
    if not path.exists():
        return {}
    cfg = yaml.safe_load(path.read_text())
    return cfg if isinstance(cfg, dict) else {}


def run_summary(run: str | Path) -> dict:
    """Method, backbone, budget and throughput (from config.yaml and metrics.jsonl; the
    checkpoint's step counter only when there is no log; the model is never built) and the
    top-1 of each evaluation found in ``RUN/eval``."""
    d = _run_dir(run)
    cfg, rows, evals = read_config(d), read_metrics(d), read_evals(d)
    steps = epochs = minutes = None
    if rows:
        last = rows[-1]
        steps, epochs, minutes = last.get("step"), last.get("epoch"), last.get("elapsed_min")
    elif (d / "checkpoint.pt").exists():
        ck = safe_load(d / "checkpoint.pt")
        steps, minutes = ck.get("step"), ck.get("elapsed", 0) / 60
        cfg = cfg or ck.get("config", {})
    # images/s: median over the log windows, the first (warm-up, compilation) left out when there are others
    ips = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), (int, float))]
    ips = ips[1:] if len(ips) > 1 else ips
    return {"run": str(d), "name": d.name, "method": cfg.get("method", {}).get("name"),
            "backbone": _backbone(cfg.get("backbone", {})), "steps": steps, "epochs": epochs, "minutes": minutes,
            "batch_size": cfg.get("data", {}).get("batch_size"), "data": cfg.get("data", {}).get("train"),
            "images_per_s": statistics.median(ips) if ips else None,
            "knn": _score(evals, "knn"), "linear": _score(evals, "linear"), "finetune": _score(evals, "finetune"),
            **{f"{p}_test": _test_data(evals, p) for p in ("knn", "linear", "finetune")}}


def _backbone(b: dict) -> str | None:
    """The backbone's name and what it started from: ``timm:convnext_atto (pretrained)``,
    ``resnet18 (from source.safetensors)``."""
    name = b.get("name")
    if name and b.get("weights"):
        return f"{name} (from {Path(b['weights']).name})"
    if name and (b.get("pretrained") or b.get("pretrained_file")):
        return f"{name} (pretrained)"
    return name


def _budget(s: dict) -> str:
    parts = []
    if s["steps"] is not None:
        parts.append(f"{s['steps']} steps")
    if s["epochs"] is not None:
        parts.append(f"{s['epochs']:.2f} ep")
    if s["minutes"] is not None:
        parts.append(f"{s['minutes']:.1f} min")
    return " / ".join(parts) or "-"


def _num(v, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


COLUMNS = ("run", "method", "backbone", "data", "budget", "images/s", "kNN", "linear", "fine-tune")


def compare_rows(runs: list[str | Path]) -> list[dict]:
    return [run_summary(r) for r in runs]


def _scored(s: dict, protocol: str) -> str:
    """A top-1 with the test data it was measured on: ``0.8717 (fashion-mnist:test)``."""
    if s[protocol] is None:
        return "-"
    return f"{s[protocol]:.4f}" + (f" ({s[protocol + '_test']})" if s.get(protocol + "_test") else "")


def compare_table(summaries: list[dict]) -> str:
    """A markdown table of runs side by side: the training data, and each evaluation's top-1 with
    the test data it used (from ``RUN/eval``); ``-`` where a value is missing."""
    cells = [[s["name"], s["method"] or "-", s["backbone"] or "-", s["data"] or "-", _budget(s),
              _num(s["images_per_s"], ".0f"), _scored(s, "knn"), _scored(s, "linear"), _scored(s, "finetune")]
             for s in summaries]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]
    line = lambda row: "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |"   # noqa: E731
    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in cells])


# ---- the HTML page ------------------------------------------------------------------------------
CAPTIONS = {
    "embedding_pca": "2-D PCA map of the backbone's features, coloured by label",
    "embedding_tsne": "t-SNE map of the L2-normalized features, coloured by label",
    "embedding_umap": "UMAP of the L2-normalized features, coloured by label",
    "retrieval": "Nearest-neighbour retrieval: query (first column) and its nearest images by cosine similarity "
                 "(green frame: same label, red: another)",
    "attention": "Class-token attention in the last block: image, each head, mean of the heads",
    "mim_masks": "Masked image modeling: image | masked input | reconstruction | reconstruction with the "
                 "visible patches pasted",
    "reconstructions": "Tokenizer: originals (top) and their reconstructions (bottom)",
}
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#222;background:#f6f6f4}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.6em;margin:.4em 0 .1em} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.6em}
.sub{color:#666;margin-bottom:1em}
table{border-collapse:collapse;margin:.5em 0;background:#fff}
th,td{border:1px solid #d8d8d8;padding:4px 10px;text-align:left;font-size:.92em}
th{background:#eef1f5} td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px;display:table}
figure img{display:block;max-width:100%;height:auto;image-rendering:pixelated}
figcaption{display:table-caption;caption-side:bottom;font-size:.85em;color:#555;background:#fff;padding:2px 6px 6px}
pre{background:#fff;border:1px solid #ddd;padding:10px;overflow:auto;font-size:.85em;max-height:520px}
.note{color:#777;font-style:italic}
"""


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(uri: str, caption: str, alt: str) -> str:
    e = html.escape
    return f'<figure><img src="{uri}" alt="{e(alt)}"><figcaption>{e(caption)}</figcaption></figure>'


def _table(header: list[str], rows: list[list], numeric: set = frozenset()) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{e(str(v))}</td>' if i in numeric else f"<td>{e(str(v))}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return "-" if v is None else str(v)


def _eval_section(evals: list[dict]) -> str:
    rows = [r for r in evals if r["protocol"] != "health"]
    if not rows:
        return ('<p class="note">No evaluation results in RUN/eval/ yet: run e.g. <code>selfsight eval knn RUN '
                '--train fashion-mnist --test fashion-mnist:test --save</code>.</p>')
    skip = {"protocol", "model", "features", "train", "test", "top1", "top5", "file", "method", "backbone", "sweep"}
    table = []
    for r in rows:
        details = ", ".join(f"{k} {_fmt(v)}" for k, v in r.items()
                            if k not in skip and isinstance(v, (int, float, str)) and not isinstance(v, bool))
        table.append([r["protocol"], r.get("model", "trained"), r.get("features", "-"),
                      f"{r.get('train', '-')} → {r.get('test', '-')}", _fmt(r.get("top1")), _fmt(r.get("top5")),
                      details])
    return _table(["protocol", "model", "features", "train → test", "top-1", "top-5", "details"], table, {4, 5})


def _health_section(evals: list[dict]) -> str:
    rows = [r for r in evals if r["protocol"] == "health"]
    if not rows:
        return ('<p class="note">No health metrics yet: <code>selfsight eval health RUN --data DATA --save</code>.</p>')
    info = ("model", "data", "features", "method", "backbone", "protocol", "file")
    keys = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and k not in info and isinstance(v, (int, float))
                 and not isinstance(v, bool)]
    header = ["metric"] + [f"{r.get('model', 'trained')} ({r['file']})" for r in rows]
    return _table(header, [[k] + [_fmt(r.get(k)) for r in rows] for k in keys], set(range(1, len(rows) + 1)))


def build_report(run: str | Path) -> str:
    """The HTML page of a run (see the module docstring for its sources)."""
    d = _run_dir(run)
    e = html.escape
    s = run_summary(d)
    evals = read_evals(d)
    cfg_path = d / "config.yaml"
    config_text = cfg_path.read_text() if cfg_path.exists() else yaml.safe_dump(read_config(d))
    overview = _table(["run", "method", "backbone", "data", "batch", "budget", "images/s", "kNN", "linear",
                       "fine-tune"],
                      [[s["name"], s["method"] or "-", s["backbone"] or "-", s["data"] or "-", _fmt(s["batch_size"]),
                        _budget(s), _num(s["images_per_s"], ".0f"), _num(s["knn"]), _num(s["linear"]),
                        _num(s["finetune"])]], {4, 6, 7, 8, 9})
    charts = []
    for name, chart in curves(read_metrics(d)).items():
        buf = io.BytesIO()
        chart.save(buf, format="PNG")
        charts.append(_figure(_png_uri(buf.getvalue()), f"{name} per step (metrics.jsonl)", f"curve {name}"))
    pics = []
    for path in sorted((d / "pictures").glob("*.png")):
        if path.stem.startswith("curve_") or path.name.startswith("."):
            continue
        pics.append(_figure(_png_uri(path.read_bytes()), CAPTIONS.get(path.stem, path.stem), path.stem))
    no_curves = '<p class="note">No metrics.jsonl in this run.</p>'
    no_pics = ('<p class="note">No pictures yet: <code>selfsight pictures RUN</code> writes the embedding map, '
               'retrieval grid and (ViTs) attention maps.</p>')
    title = f"selfsight run {s['name']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body><main>
<h1>{e(title)}</h1>
<div class="sub">{e(str(d.resolve()))}</div>
<section id="overview"><h2>Overview</h2>{overview}</section>
<section id="evaluation"><h2>Evaluation</h2>{_eval_section(evals)}</section>
<section id="health"><h2>Health metrics</h2>{_health_section(evals)}</section>
<section id="pictures"><h2>Pictures</h2><div class="grid">{''.join(pics) or no_pics}</div></section>
<section id="curves"><h2>Training curves</h2><div class="grid">{''.join(charts) or no_curves}</div></section>
<section id="config"><h2>Config</h2><pre>{e(config_text)}</pre></section>
</main></body></html>
"""


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the page to ``out`` (default ``RUN/report.html``) and return its path."""
    path = Path(out) if out else _run_dir(run) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(run), encoding="utf-8")
    return path
