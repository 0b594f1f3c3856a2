"""Embeddings of every image in a folder: batched, with a progress bar, resumable.

The folder is indexed once by ``selfsight.data.folder.ImageFolder`` (cached index; hidden,
empty and non-image files skipped and counted); images that fail to decode are skipped and
counted too (``load_image``), never a crash. Work is cut into shards of ``shard_size`` images
in index order; each finished shard is written atomically to ``OUT.parts/`` (features +
the names it holds), so an interrupted run continues with the first missing shard. When all
shards exist they are joined into the output and ``OUT.parts/`` is removed:

- ``OUT.npy`` (N×D float32) + ``OUT.files.txt`` (one path per line, relative to the folder) +
  ``OUT.json`` (folder, model, preprocessing, counts), or
- ``OUT.parquet`` (columns ``file``, ``embedding``; the same JSON in the schema metadata;
  needs pyarrow).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from selfsight.data.folder import ImageFolder
from selfsight.data.images import BrokenImageError, load_image
from selfsight.deploy.load import features, is_hub_folder, load_backbone
from selfsight.files import atomic_write
from selfsight.progress import Progress

log = logging.getLogger("selfsight.deploy")


class _Images(Dataset):
    """Image ``i`` of an ImageFolder, preprocessed, with its name; a broken file gives ``None``."""

    def __init__(self, folder, preprocess):
        self.folder, self.preprocess = folder, preprocess
        self.real_root = os.path.realpath(folder.root)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, idx: int):
        rel = self.folder.samples[idx][0]
        path = os.path.join(self.folder.root, rel)
        try:
            real = os.path.realpath(path)       # the folder's rule: no link out of the root unless followed
            if not self.folder.follow_symlinks and os.path.commonpath([real, self.real_root]) != self.real_root:
                raise BrokenImageError(path, "resolves outside the folder (follow_symlinks=False)")
            image = load_image(path)
        except (BrokenImageError, OSError) as e:
            log.warning("skipping unreadable image %s: %s", rel, getattr(e, "reason", e))
            return None
        return self.preprocess(image), rel


def _collate(items):
    good = [it for it in items if it is not None]
    x = torch.stack([it[0] for it in good]) if good else None
    return x, [it[1] for it in good], len(items) - len(good)


def _fingerprint(model, net: nn.Module) -> str:
    """Identifies the model a shard was computed with (path + size + mtime, or a weight hash)."""
    if isinstance(model, (str, Path)):
        p = Path(model).resolve()
        target = p / "checkpoint.pt" if p.is_dir() else p
        if p.is_dir() and is_hub_folder(p):                 # an export --format hf folder
            target = p / "model.safetensors"
        st = target.stat()
        return f"{target}:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha1()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())   # any dtype
    return "weights:" + h.hexdigest()


def _out_paths(out: Path) -> dict:
    if out.suffix == ".parquet":
        return {"kind": "parquet", "data": out, "meta": None, "files": None}
    base = out.with_suffix("") if out.suffix == ".npy" else out
    return {"kind": "npy", "data": base.with_name(base.name + ".npy"),
            "files": base.with_name(base.name + ".files.txt"),
            "meta": base.with_name(base.name + ".json")}


@torch.no_grad()
def embed(model, folder: str | Path, out: str | Path, batch_size: int = 256, workers: int = 2,
          device: str | None = None, shard_size: int = 4096, max_shards: int | None = None,
          progress: bool = True, preprocess=None) -> dict:
    """Embed every image under ``folder`` with ``model`` and write ``out`` (module docstring).

    ``model``: an exported file or hub folder, a run folder or a checkpoint (``load_backbone``), or an
    ``nn.Module`` together with ``preprocess``. ``max_shards``: stop after computing that many
    new shards (an interrupted run; call again to continue). Returns a summary: images, skipped,
    dim, shards computed/reused, done, and the paths written.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model, nn.Module):
        if preprocess is None:
            raise ValueError("embed(module, ...) needs preprocess= (see selfsight.load_backbone)")
        net, model_name = model.to(device).eval(), type(model).__name__
    else:
        net, preprocess = load_backbone(model, device)
        model_name = str(model)
    out = Path(out)
    paths = _out_paths(out)
    folder = ImageFolder(folder)
    names = [folder.samples[i][0] for i in range(len(folder))]
    parts = paths["data"].with_name(paths["data"].name + ".parts")
    manifest = {"folder": folder.root, "model": _fingerprint(model, net), "shard_size": int(shard_size),
                "n": len(names), "names_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest(),
                "preprocess": repr(preprocess)}
    man_path = parts / "manifest.json"
    if paths["data"].exists() and not parts.exists():
        log.warning("%s exists already: it will be replaced by the embeddings of %s", paths["data"], folder.root)
    if parts.exists():
        old = json.loads(man_path.read_text()) if man_path.exists() else None
        if old != manifest:
            log.info("%s holds shards of another folder/model/shard size: starting over", parts)
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write(man_path, lambda f: f.write(json.dumps(manifest).encode()))

    n_shards = (len(names) + shard_size - 1) // shard_size
    done = [i for i in range(n_shards) if (parts / f"shard-{i:05d}.json").exists()]
    todo = sorted(set(range(n_shards)) - set(done))
    reused_images = sum(min(shard_size, len(names) - i * shard_size) for i in done)
    bar = Progress(len(names), "embedding", enabled=progress, initial=reused_images)
    if max_shards is not None:
        todo = todo[:max_shards]
    # one loader over every missing shard (workers start once); batches never cross a shard's end
    batches, owner = [], []
    for s in todo:
        stop = min((s + 1) * shard_size, len(names))
        for b in range(s * shard_size, stop, batch_size):
            batches.append(list(range(b, min(b + batch_size, stop))))
            owner.append(s)
    loader = DataLoader(_Images(folder, preprocess), batch_sampler=batches, num_workers=workers if batches else 0,
                        collate_fn=_collate)
    computed, feats, kept, skipped = 0, [], [], 0
    for j, (x, rel, bad) in enumerate(loader):
        skipped += bad
        if x is not None:
            feats.append(features(net, x.to(device)).float().cpu())
            kept += rel
        bar.update(len(rel) + bad)
        s = owner[j]
        if j + 1 == len(batches) or owner[j + 1] != s:                 # the shard is complete: write it
            f = torch.cat(feats).numpy() if feats else np.zeros((0, getattr(net, "embed_dim", 0)), np.float32)
            atomic_write(parts / f"shard-{s:05d}.npy", lambda fh: np.save(fh, f.astype(np.float32)))
            atomic_write(parts / f"shard-{s:05d}.json",            # written last: marks the shard complete
                          lambda fh: fh.write(json.dumps({"files": kept, "skipped": skipped}).encode()))
            computed, feats, kept, skipped = computed + 1, [], [], 0
    bar.close()
    summary = {"images": len(names), "shards": n_shards, "shards_reused": len(done), "shards_computed": computed}
    if len(done) + computed < n_shards:
        return {**summary, "done": False, "parts": str(parts)}
    return {**summary, "done": True, **_join(parts, n_shards, paths, folder, model_name, preprocess)}


def _join(parts: Path, n_shards: int, paths: dict, folder, model_name: str, preprocess) -> dict:
    feats, files, skipped = [], [], 0
    for s in range(n_shards):
        info = json.loads((parts / f"shard-{s:05d}.json").read_text())
        feats.append(np.load(parts / f"shard-{s:05d}.npy"))
        files += info["files"]
        skipped += info["skipped"]
    emb = np.concatenate([f for f in feats if len(f)] or feats).astype(np.float32)   # all-broken shards: 0×?
    meta = {"folder": folder.root, "model": model_name, "count": len(files), "dim": int(emb.shape[1]),
            "skipped_unreadable": skipped, "skipped_at_index": {k: v for k, v in folder.skip_counts.items() if v},
            "preprocess": repr(preprocess)}
    if paths["kind"] == "parquet":
        try:
            import pyarrow as pa  # optional extra: pyarrow
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("writing .parquet needs pyarrow (pip install pyarrow); or give an .npy output") from None
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
        table = pa.table({"file": pa.array(files, pa.string()), "embedding": col})
        table = table.replace_schema_metadata({"selfsight": json.dumps(meta)})
        atomic_write(paths["data"], lambda f: pq.write_table(table, f))
        written = [paths["data"]]
    else:
        atomic_write(paths["data"], lambda f: np.save(f, emb))
        atomic_write(paths["files"], lambda f: f.write("".join(n + "\n" for n in files).encode()))
        atomic_write(paths["meta"], lambda f: f.write(json.dumps(meta, indent=1).encode()))
        written = [paths["data"], paths["files"], paths["meta"]]
    shutil.rmtree(parts)
    if skipped:
        log.warning("skipped %d unreadable images (see the warnings above)", skipped)
    return {"count": len(files), "dim": int(emb.shape[1]), "skipped": skipped, "written": [str(p) for p in written]}


def load_embeddings(path: str | Path) -> tuple[np.ndarray, list[str], dict]:
    """(N×D float32 embeddings, N file names relative to the folder, metadata) of an ``embed`` output."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional extra: pyarrow
        t = pq.read_table(p)
        emb = np.array(t.column("embedding").combine_chunks().flatten().to_numpy(), np.float32)   # writable copy
        meta = json.loads(t.schema.metadata[b"selfsight"])
        return emb.reshape(len(t), -1), t.column("file").to_pylist(), meta
    paths = _out_paths(p)
    for k in ("data", "files", "meta"):
        if not paths[k].exists():
            raise ValueError(f"no embeddings at {p}: {paths[k]} is missing (write them with `selfsight embed`)")
    names = paths["files"].read_text().splitlines()
    return np.load(paths["data"]), names, json.loads(paths["meta"].read_text())
