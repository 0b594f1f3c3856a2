"""Pictures of what a run learned, written as PNG to ``RUN/pictures/``:

- ``embedding_<map>.png``: a 2-D map of the frozen features (PCA; t-SNE with scikit-learn, van
  der Maaten & Hinton 2008; UMAP with umap-learn, McInnes et al. 2018), coloured by label;
- ``retrieval.png``: query images (first column) and their top-k neighbours by cosine
  similarity of the backbone features, a green frame when the label matches, red otherwise;
- ``attention.png`` (ViTs): the class token's attention over the patches in the last block,
  per head (Caron et al. 2021, DINO's ``visualize_attention.py``): softmax(q·kᵀ/√d) of the
  class-token row, computed from the block's own ``qkv`` weights on its input;
- the method's own pictures (``pictures(batch)``: MIM masks and reconstructions, tokenizer
  reconstructions), regenerated from the checkpoint on real images;
- ``curve_<metric>.png``: one chart per numeric metric of ``RUN/metrics.jsonl``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
import torchvision.utils as vutils

from selfsight.backbones.features import backbone_features
from selfsight.data import build_dataset, held_out_split
from selfsight.data.arrays import ArrayDataset
from selfsight.eval.features import extract
from selfsight.methods import hooks_of
from selfsight.nn.images import eval_resize, to_channels
from selfsight.runs import load_run
from selfsight.viz import draw

log = logging.getLogger("selfsight")
MAPS = ("pca", "tsne", "umap")
# metrics.jsonl columns that are counters or the x axis, not curves
_NOT_CURVES = {"step", "epoch"}


# ---- the numbers behind the pictures --------------------------------------------------------------
def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """N×D -> N×2: the centred features on their first two principal directions (exact SVD;
    each direction's sign is fixed so that its largest coefficient is positive)."""
    x = features.double() - features.double().mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)                  # vh: r×D, rows = directions
    v = vh[:2]
    v = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))       # deterministic signs
    out = x @ v.T
    if out.shape[1] < 2:                                                  # a single point or direction
        out = torch.cat([out, out.new_zeros(len(out), 2 - out.shape[1])], 1)
    return out.float()


def _require(method: str):
    """The module a map needs (sklearn.manifold for tsne, umap for umap), or a clear error."""
    import importlib  # optional extras: scikit-learn, umap-learn
    if method not in MAPS:
        raise ValueError(f"map must be one of {', '.join(MAPS)}, got {method!r}")
    module, package = {"pca": ("torch", "torch"), "tsne": ("sklearn.manifold", "scikit-learn"),
                       "umap": ("umap", "umap-learn")}[method]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"the {method} map needs {package}: pip install {package}") from None


def embed_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """N×D -> N×2 with ``pca``, ``tsne`` (scikit-learn) or ``umap`` (umap-learn; both on the
    L2-normalized features, the geometry that kNN uses)."""
    module = _require(method)
    if method == "pca":
        return pca_2d(features)
    x = F.normalize(features.float(), dim=1).numpy()
    # one thread: scikit-learn's OpenMP runtime beside torch's spins against it (seen: 0.4 s -> 44 s for
    # t-SNE of 60 points on a busy 2-core machine)
    from threadpoolctl import threadpool_limits  # optional extras: scikit-learn, umap-learn
    with threadpool_limits(1):
        if method == "tsne":
            perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
            xy = module.TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        else:
            xy = module.UMAP(n_neighbors=min(15, len(x) - 1), random_state=seed).fit_transform(x)
    return torch.from_numpy(xy).float()


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of Q×D queries to an N×D bank -> (similarities Q×k, bank indices Q×k),
    best first (a query that is in the bank finds itself first)."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T         # Q×N
    return sim.topk(min(k, bank.shape[0]), dim=1)


def _vit_parts(backbone):
    net = getattr(backbone, "net", None)
    blocks = getattr(net, "blocks", None)
    if blocks is None or not len(blocks) or not hasattr(blocks[-1], "attn") or not hasattr(blocks[-1].attn, "qkv"):
        return None
    return net, blocks[-1]


def has_attention(backbone) -> bool:
    """True for the timm ViTs behind ``backbones.vit.ViTBackbone``."""
    return _vit_parts(backbone) is not None


@torch.no_grad()
def cls_attention(backbone, x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W normalized images -> B×heads×h×w: the class token's attention weights over the
    patches in the last block, softmax(q_cls·kᵀ/√d + bias) with q, k from the block's ``qkv``
    projection of its LayerNorm-ed input (the relative position bias added when the backbone
    has one, as its forward does). The block input is read with a forward pre-hook on that one
    block instance, removed afterwards."""
    parts = _vit_parts(backbone)
    if parts is None:
        raise ValueError("attention maps need a ViT backbone (backbone.name: vit_tiny, vit_small, ...)")
    net, last = parts
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["x"]
        seen["bias"] = kwargs.get("attn_mask")

    handle = last.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        backbone.forward_features(x)
    finally:
        handle.remove()
    a = last.attn
    y = last.norm1(seen["x"])                                               # B×(P+N)×D
    b, n, _ = y.shape
    qkv = a.qkv(y).reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)   # 3×B×heads×(P+N)×d
    q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)                 # B×heads×(P+N)×(P+N)
    if seen["bias"] is not None:
        logits = logits + seen["bias"]
    prefix = net.num_prefix_tokens
    attn = logits.float().softmax(-1)[:, :, 0, prefix:]                     # class-token row, patches only
    p = backbone.patch_size
    return attn.reshape(b, a.num_heads, x.shape[-2] // p, x.shape[-1] // p)


# ---- images ------------------------------------------------------------------------------------
def _display(x01: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """B×C×S×S in [0, 1] -> B×3×S'×S' (gray made RGB; small images enlarged, nearest)."""
    if x01.shape[1] == 1:
        x01 = x01.expand(-1, 3, -1, -1)
    if x01.shape[-1] < min_side:
        x01 = F.interpolate(x01, scale_factor=-(-min_side // x01.shape[-1]), mode="nearest")
    return x01.clamp(0, 1)


def _framed(tiles: torch.Tensor, rgb: tuple, width: int = 3) -> torch.Tensor:
    out = tiles.clone()
    c = torch.tensor(rgb, dtype=out.dtype).view(1, 3, 1, 1) / 255
    out[..., :width, :], out[..., -width:, :] = c, c
    out[..., :, :width], out[..., :, -width:] = c, c
    return out


def retrieval_grid(images01: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None,
                   queries: int = 8, k: int = 8) -> torch.Tensor:
    """Rows of [query | its k nearest other images], 3×H×W in [0, 1]. Queries are the first
    ``queries`` images; the bank is all of them (the query itself, found first, is not repeated)."""
    q = min(queries, len(features))
    _, idx = nearest_neighbours(features[:q], features, k + 1)
    tiles = _display(images01)
    rows = []
    for i in range(q):
        others = [j for j in idx[i].tolist() if j != i][:k]
        row = [tiles[i:i + 1]]
        for j in others:
            t = tiles[j:j + 1]
            if labels is not None and labels[i] >= 0:
                t = _framed(t, (44, 160, 44) if labels[j] == labels[i] else (214, 39, 40))
            row.append(t)
        row += [torch.ones_like(tiles[:1])] * (k + 1 - len(row))
        rows.append(torch.cat(row))
    return vutils.make_grid(torch.cat(rows), nrow=k + 1, padding=2, pad_value=1.0)


def attention_grid(images01: torch.Tensor, attn: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Rows of [image | each head's map overlaid | mean over heads], 3×H×W in [0, 1]. Each map is
    scaled to [0, 1] by its own min and max and enlarged to the image (nearest: one cell per patch)."""
    tiles = _display(images01)
    side = tiles.shape[-1]
    maps = torch.cat([attn, attn.mean(1, keepdim=True)], 1)                  # B×(heads+1)×h×w
    lo = maps.flatten(2).min(-1).values[..., None, None]
    hi = maps.flatten(2).max(-1).values[..., None, None]
    maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    maps = F.interpolate(maps, size=(side, side), mode="nearest")           # B×(heads+1)×S×S
    over = alpha * draw.heat(maps) + (1 - alpha) * tiles[:, None]           # B×(heads+1)×3×S×S
    cols = torch.cat([tiles[:, None], over], 1)                             # B×(heads+2)×3×S×S
    return vutils.make_grid(cols.flatten(0, 1), nrow=cols.shape[1], padding=2, pad_value=1.0)


# ---- curves -----------------------------------------------------------------------------------
def read_metrics(run: str | Path) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl`` (a torn last line is ignored); [] when absent."""
    path = Path(run) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def curves(rows: list[dict]) -> dict:
    """{metric: Pillow image}: one line chart per numeric column of the metrics rows against the
    step (columns that never change, such as a zero counter, are left out; ``loss`` always kept)."""
    names: list[str] = []
    for row in rows:
        names += [k for k, v in row.items() if k not in names and k not in _NOT_CURVES
                  and isinstance(v, (int, float)) and not isinstance(v, bool)]
    charts = {}
    for name in names:
        pts = [(float(r.get("step", i)), float(r[name])) for i, r in enumerate(rows)
               if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)
               and abs(float(r[name])) != float("inf") and r[name] == r[name]]
        if not pts or (name != "loss" and len({y for _, y in pts}) == 1):
            continue
        charts[name] = draw.line_chart([p[0] for p in pts], [p[1] for p in pts], title=name, xlabel="step")
    return charts


# ---- the run's images ---------------------------------------------------------------------------
def sample_images(dataset, n: int, size: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images drawn without replacement (seeded) as uint8 n×C×size×size, with their labels
    (−1 when unlabeled); folder images are resized as the evaluation resizes them."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n]
    if isinstance(dataset, ArrayDataset):
        images, labels = dataset.images[idx], dataset.labels[idx]
    else:
        items = [dataset[int(i)] for i in idx]
        images = torch.stack([eval_resize(TF.pil_to_tensor(it["image"]).float()[None], size)[0].round().to(torch.uint8)
                              if not torch.is_tensor(it["image"]) else it["image"] for it in items])
        labels = torch.tensor([int(it["label"]) for it in items])
    if images.shape[-1] != size or images.shape[-2] != size:
        images = eval_resize(images.float(), size).round().clamp(0, 255).to(torch.uint8)
    images = to_channels(images, channels)                 # gray <-> RGB to what the run was trained on
    return images.contiguous(), labels.long()


def _save(image, path: Path) -> None:
    """A tensor 3×H×W in [0, 1] or a Pillow image -> PNG, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    if torch.is_tensor(image):
        vutils.save_image(image.float().cpu(), tmp)
    else:
        image.save(tmp)
    os.replace(tmp, path)


def write_pictures(run: str | Path, data=None, out: str | Path | None = None, n: int = 512,
                   maps: tuple = ("pca",), features: str = "cls", queries: int = 8, k: int = 8,
                   device: str = "cpu", data_root: str = "") -> dict:
    """Write the run's pictures to ``out`` (default ``RUN/pictures``) -> {name: path}.

    ``data``: a data spec or data set (default: the held-out split of the run's training set, or
    the training set); ``n`` images are drawn from it for the maps, retrieval and attention.
    ``maps``: any of pca, tsne, umap. Curves come from ``RUN/metrics.jsonl`` alone.
    """
    run = Path(run)
    run_dir = run if run.is_dir() else run.parent
    out = Path(out) if out else run_dir / "pictures"
    for m in maps:                              # fail before any work when a map's package is missing
        _require(m)
    model, cfg, pre = load_run(run, device)
    out.mkdir(parents=True, exist_ok=True)
    earlier = {p.name for p in out.glob("*.png")}
    written: dict[str, Path] = {}
    for name, chart in curves(read_metrics(run_dir)).items():
        written[f"curve_{name}"] = out / f"curve_{name}.png"
        _save(chart, written[f"curve_{name}"])
    if data is None:
        data = held_out_split(cfg.data.train) or cfg.data.train
    dataset = build_dataset(data, data_root or cfg.data.root) if isinstance(data, str) else data
    images, labels = sample_images(dataset, n, pre["size"], pre["channels"], cfg.train.seed)
    names = list(getattr(dataset, "classes", []) or [])
    mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
    x01 = images.float() / 255                                               # n×C×S×S in [0, 1]
    has_labels = bool((labels >= 0).all())

    hooks = hooks_of(model)
    if hooks.pictures is not None:              # the method's own: MIM masks, tokenizer reconstructions
        xb = ((x01[:8] - mean) / std).to(device)
        views = [xb] * max(2, cfg.views.n_views)
        for name, image in hooks.pictures({"views": views, "label": labels[:8], "skipped": 0}).items():
            written[name] = out / f"{name}.png"
            _save(image, written[name])
    try:
        backbone = model.backbone
    except (AttributeError, ValueError, RuntimeError):   # e.g. a tokenizer run: no backbone to picture
        return written
    feats, _ = extract(backbone_features(backbone, features), ArrayDataset(images, labels), pre, device, 256)
    title = f"{cfg.method.name} / {cfg.backbone.name}: {len(feats)} images"
    for m in maps:
        xy = embed_2d(feats, m, cfg.train.seed)
        label, axis = {"pca": ("PCA", "PC"), "tsne": ("t-SNE", "t-SNE "), "umap": ("UMAP", "UMAP ")}[m]
        img = draw.scatter(xy, labels if has_labels else None, names, title=f"{label} of {features} features "
                           f"({title})", xlabel=f"{axis}1", ylabel=f"{axis}2")
        written[f"embedding_{m}"] = out / f"embedding_{m}.png"
        _save(img, written[f"embedding_{m}"])
    written["retrieval"] = out / "retrieval.png"
    _save(retrieval_grid(x01, feats, labels if has_labels else None, queries, k), written["retrieval"])
    if has_attention(backbone):
        xa = ((x01[:queries] - mean) / std).to(device)
        attn = cls_attention(backbone, xa).cpu()
        written["attention"] = out / "attention.png"
        _save(attention_grid(x01[:queries], attn), written["attention"])
    log.info("wrote %d pictures to %s", len(written), out)
    replaced = sorted(earlier & {p.name for p in written.values()})
    if replaced:
        log.warning("replaced %d earlier pictures in %s (%s)", len(replaced), out,
                    ", ".join(replaced[:6]) + (", ..." if len(replaced) > 6 else ""))
    return written
