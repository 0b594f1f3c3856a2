"""Nearest neighbours by cosine similarity over ``selfsight embed`` outputs, and a picture of them.

Search is exact: L2-normalised embeddings, one matrix product per chunk of the collection,
``topk`` (torch). With faiss installed, collections of ``FAISS_MIN`` or more vectors go through
``faiss.IndexFlatIP`` (the same exact inner-product search, multi-threaded BLAS in C++).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from selfsight.data.images import load_image
from selfsight.deploy.embeddings import load_embeddings
from selfsight.deploy.load import features, load_backbone

FAISS_MIN = 200_000
CHUNK = 65_536


def cosine_topk(bank: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` cosine neighbours: bank N×D, queries Q×D -> (scores Q×k, indices Q×k)."""
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be auto, torch or faiss, got {backend!r}")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    if backend == "faiss" or (backend == "auto" and bank.shape[0] >= FAISS_MIN):
        try:
            import faiss  # optional extra: faiss-cpu
        except ImportError:
            if backend == "faiss":
                raise ValueError("backend faiss: faiss is not installed (pip install faiss-cpu)") from None
        else:
            index = faiss.IndexFlatIP(bank.shape[1])
            index.add(np.ascontiguousarray(bank.numpy()))
            scores, idx = index.search(np.ascontiguousarray(queries.numpy()), k)
            return torch.from_numpy(scores), torch.from_numpy(idx).long()
    best_s, best_i = None, None
    for start in range(0, bank.shape[0], CHUNK):
        s = queries @ bank[start:start + CHUNK].T                         # Q×chunk cosine similarities
        s, i = s.topk(min(k, s.shape[1]), dim=1)
        i = i + start
        if best_s is not None:
            s, j = torch.cat([best_s, s], 1).topk(k, dim=1)
            i = torch.cat([best_i, i], 1).gather(1, j)
        best_s, best_i = s, i
    return best_s, best_i


def neighbors(embeddings: str | Path, query, k: int = 10, picture: str | Path | None = None,
              model: str | Path | None = None, backend: str = "auto") -> list[dict]:
    """The ``k`` most similar images of an embedding file to ``query``.

    ``query``: an index into the collection (int or digits), a file name of the collection (as in
    its file list), or the path of any image (embedded with ``model``, default: the model the
    collection was embedded with). A query from the collection is not its own neighbour: the ``k``
    rows are other images. Returns ``[{rank, index, file, score}]`` (rank 0 first);
    ``picture``: also writes a PNG grid (query, then the neighbours with their scores).
    """
    emb, names, meta = load_embeddings(embeddings)
    bank = torch.from_numpy(emb)
    q_index, q_image = _resolve(query, names, meta.get("folder"))
    if q_index is not None:
        q = bank[q_index:q_index + 1]
        q_path = Path(meta["folder"]) / names[q_index]
    else:
        src = model or meta.get("model")
        if not src or not Path(src).exists():
            raise ValueError(f"to embed the query image {query} give --model (the collection's model "
                             f"{src!r} is not a file or run folder here)")
        net, pre = load_backbone(src)
        q = features(net, pre(load_image(q_image))[None])
        q_path = q_image
    scores, idx = cosine_topk(bank, q, k + (q_index is not None), backend)
    found = [(float(s), int(i)) for s, i in zip(scores[0], idx[0]) if int(i) != q_index][:k]
    rows = [{"rank": r, "index": i, "file": names[i], "score": round(s, 6)} for r, (s, i) in enumerate(found)]
    if picture:
        write_picture(picture, q_path, [Path(meta["folder"]) / row["file"] for row in rows],
                      [row["score"] for row in rows])
    return rows


def _resolve(query, names: list[str], folder: str | None = None) -> tuple[int | None, Path | None]:
    """The query as an index of the collection (an index, a listed name, or the path of one of its
    files, however written), else as an image file to embed."""
    if isinstance(query, (int, np.integer)) or (isinstance(query, str) and query.isdigit()
                                                 and not Path(query).exists()):
        i = int(query)
        if not 0 <= i < len(names):
            raise ValueError(f"query index {i} is out of range: the collection holds {len(names)} images")
        return i, None
    q = str(query)
    lookup = {n: i for i, n in enumerate(names)}
    if q in lookup:
        return lookup[q], None
    if Path(q).is_file():
        if folder is not None:                 # a file of the collection given by its path
            try:
                rel = Path(q).resolve().relative_to(Path(folder).resolve()).as_posix()
            except ValueError:
                rel = None
            if rel in lookup:
                return lookup[rel], None
        return None, Path(q)
    raise ValueError(f"query {q!r} is neither an index, a file of the collection, nor an image file")


def write_picture(path: str | Path, query: Path, results: list[Path], scores: list[float], tile: int = 96) -> None:
    """A one-row PNG: the query (blue frame), then the results with rank and cosine score."""
    pad, text_h = 4, 14
    n = 1 + len(results)
    canvas = Image.new("RGB", (n * (tile + pad) + pad, tile + 2 * pad + text_h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (p, label) in enumerate([(query, "query")] + [(p, f"{r + 1}: {s:.3f}") for r, (p, s)
                                                         in enumerate(zip(results, scores))]):
        try:
            img = ImageOps.pad(load_image(p), (tile, tile), color="white")
        except (OSError, ValueError):
            img = Image.new("RGB", (tile, tile), "lightgray")
        x = pad + j * (tile + pad)
        canvas.paste(img, (x, pad))
        if j == 0:
            draw.rectangle([x - 2, pad - 2, x + tile + 1, pad + tile + 1], outline="blue", width=2)
        draw.text((x + 2, pad + tile + 1), label, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
