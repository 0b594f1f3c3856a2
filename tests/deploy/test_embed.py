"""Embeddings of a folder of real Fashion-MNIST PNGs: equal to the backbone's features, resumable
after an interruption without redoing finished shards; neighbours find the image itself first
and its near-duplicates next; the exact search agrees with a brute-force reference."""
import io
import json

import numpy as np
import pytest
import torch
from helpers import normalized, tiny_overrides
from PIL import Image

from selfsight.data import ArrayDataset
from selfsight.deploy import cosine_topk, embed, load_backbone, load_embeddings, neighbors
from selfsight.engine.trainer import pretrain
from selfsight.resolve import load_config
from selfsight.runs import load_run

N = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory, fmnist_small):
    out = tmp_path_factory.mktemp("runs") / "resnet"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2})), out, dataset=fmnist_small)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, fmnist_test):
    """40 real test images as gray PNGs, a 1-pixel-shifted copy of img_000, a JPEG re-encode of
    img_007 (a near-duplicate each), and one broken file."""
    root = tmp_path_factory.mktemp("images")
    sub = root / "sub"
    sub.mkdir()
    for i in range(N):
        Image.fromarray(fmnist_test.images[i, 0].numpy()).save((sub if i % 5 == 0 else root) / f"img_{i:03d}.png")
    shifted = torch.roll(fmnist_test.images[0, 0], 1, dims=1)
    Image.fromarray(shifted.numpy()).save(root / "near_shift.png")
    buf = io.BytesIO()
    Image.fromarray(fmnist_test.images[7, 0].numpy()).save(buf, "JPEG", quality=90)
    (root / "near_jpeg.jpg").write_bytes(buf.getvalue())
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def original(name: str, fmnist_test) -> torch.Tensor:
    """The uint8 1×28×28 image a file of the folder was written from."""
    if name == "near_shift.png":
        return torch.roll(fmnist_test.images[0], 1, dims=2)
    stem = name.rsplit("/", 1)[-1]
    return fmnist_test.images[int(stem[4:7])]


def test_embeddings_match_backbone_features(run, folder, tmp_path, fmnist_test):
    res = embed(run, folder, tmp_path / "emb.npy", batch_size=8, workers=0, shard_size=16, progress=False)
    assert res["done"] and res["count"] == N + 2 and res["skipped"] == 1 and res["dim"] == 64
    emb, names, meta = load_embeddings(tmp_path / "emb.npy")
    assert emb.shape == (N + 2, 64) and emb.dtype == np.float32 and len(names) == N + 2
    assert "broken.png" not in names and "sub/img_005.png" in names and "near_jpeg.jpg" in names
    assert meta["folder"] == str(folder) and meta["skipped_unreadable"] == 1
    assert not (tmp_path / "emb.npy.parts").exists()
    model, _, _ = load_run(run)
    keep = [i for i, n in enumerate(names) if n != "near_jpeg.jpg"]
    x = normalized(ArrayDataset(torch.stack([original(names[i], fmnist_test) for i in keep])))
    with torch.no_grad():
        ref = model.backbone.forward_features(x).cls
    assert np.abs(emb[keep] - ref.numpy()).max() <= 1e-5
    assert ref.std(0).mean() > 1e-3


class Counting(torch.nn.Module):
    """The backbone, counting the images it embeds."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.net(x)


def test_interrupted_embedding_resumes_without_redoing_work(run, folder, tmp_path):
    net, pre = load_backbone(run)
    full = embed(Counting(net), folder, tmp_path / "full.npy", workers=0, shard_size=16, progress=False,
                 preprocess=pre)
    first = Counting(net)
    part = embed(first, folder, tmp_path / "emb.npy", workers=0, shard_size=16, max_shards=1, progress=False,
                 preprocess=pre)
    assert not part["done"] and part["shards_computed"] == 1
    assert first.seen in (15, 16)                                      # 16 files, perhaps the broken one
    assert (tmp_path / "emb.npy.parts" / "shard-00000.npy").exists() and not (tmp_path / "emb.npy").exists()
    second = Counting(net)
    again = embed(second, folder, tmp_path / "emb.npy", workers=0, shard_size=16, progress=False, preprocess=pre)
    assert again["done"] and again["shards_reused"] == 1 and again["shards_computed"] == 2
    assert first.seen + second.seen == N + 2                           # every readable image embedded once
    a, names_a, _ = load_embeddings(tmp_path / "full.npy")
    b, names_b, _ = load_embeddings(tmp_path / "emb.npy")
    assert names_a == names_b and np.array_equal(a, b)


def test_resume_refuses_shards_of_another_model(run, folder, tmp_path):
    net, pre = load_backbone(run)
    embed(net, folder, tmp_path / "e.npy", workers=0, shard_size=16, max_shards=1, progress=False, preprocess=pre)
    other = Counting(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 8)))
    res = embed(other, folder, tmp_path / "e.npy", workers=0, shard_size=16, progress=False, preprocess=pre)
    assert res["shards_reused"] == 0 and other.seen == N + 2 and load_embeddings(tmp_path / "e.npy")[0].shape[1] == 8


def test_neighbors_leave_out_the_query_and_find_near_duplicates(run, folder, tmp_path):
    embed(run, folder, tmp_path / "emb.npy", workers=0, shard_size=16, progress=False)
    _, names, _ = load_embeddings(tmp_path / "emb.npy")
    rows = neighbors(tmp_path / "emb.npy", "sub/img_000.png", k=5, picture=tmp_path / "nn.png")
    assert [r["rank"] for r in rows] == [0, 1, 2, 3, 4]                # k others: the query is not counted
    assert "sub/img_000.png" not in [r["file"] for r in rows]
    assert rows[0]["file"] == "near_shift.png"
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    rows = neighbors(tmp_path / "emb.npy", str(names.index("img_007.png")), k=3)
    assert len(rows) == 3 and rows[0]["file"] == "near_jpeg.jpg"
    # a file of the collection given by its full path is the collection's, and left out too
    rows = neighbors(tmp_path / "emb.npy", str((folder / "img_007.png").resolve()), k=3)
    assert "img_007.png" not in [r["file"] for r in rows] and rows[0]["file"] == "near_jpeg.jpg"
    # a query image from outside the collection is embedded with the collection's model
    outside = tmp_path / "query.png"
    Image.open(folder / "img_007.png").save(outside)
    rows = neighbors(tmp_path / "emb.npy", outside, k=2)
    assert rows[0]["file"] == "img_007.png" and rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
    pic = Image.open(tmp_path / "nn.png")
    assert pic.size[0] > 6 * 96 and pic.mode == "RGB"
    with pytest.raises(ValueError, match="out of range"):
        neighbors(tmp_path / "emb.npy", "999", k=2)


def test_cosine_topk_matches_brute_force(monkeypatch):
    import selfsight.deploy.search as nb
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(1000, 16, generator=g), torch.randn(7, 16, generator=g)
    monkeypatch.setattr(nb, "CHUNK", 128)                               # several chunks merged
    scores, idx = cosine_topk(bank, queries, 10, backend="torch")
    sim = torch.stack([torch.tensor([float(q @ b / (q.norm() * b.norm())) for b in bank]) for q in queries])
    ref_s, ref_i = sim.sort(1, descending=True)
    assert torch.equal(idx, ref_i[:, :10]) and torch.allclose(scores, ref_s[:, :10], atol=1e-5)
    try:
        import faiss  # noqa: F401  (optional: the same exact search through faiss.IndexFlatIP)
    except ImportError:
        return
    f_scores, f_idx = cosine_topk(bank, queries, 10, backend="faiss")
    assert torch.equal(f_idx, idx) and torch.allclose(f_scores, scores, atol=1e-5)


def test_cli_embed_and_neighbors(run, folder, tmp_path, capsys):
    from selfsight.cli import main
    assert main(["embed", str(run), str(folder), "--out", str(tmp_path / "e.npy"), "--workers", "0",
                 "--shard-size", "16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["count"] == N + 2 and res["skipped"] == 1
    assert main(["neighbors", str(tmp_path / "e.npy"), "near_shift.png", "--k", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0]["file"] == "sub/img_000.png"
    assert main(["neighbors", str(tmp_path / "e.npy"), "near_shift.png", "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "nearest to near_shift.png" in lines[0] and lines[1].split() == ["rank", "score", "index", "file"]
    assert lines[2].split()[0] == "1" and lines[2].split()[-1] == "sub/img_000.png" and len(lines) == 4
    assert main(["neighbors", str(tmp_path / "e.npy"), "no_such.png"]) == 2
    assert "selfsight: error: query 'no_such.png' is neither" in capsys.readouterr().err


def test_parquet_output(run, folder, tmp_path):
    pytest.importorskip("pyarrow")
    embed(run, folder, tmp_path / "e.parquet", workers=0, shard_size=16, progress=False)
    embed(run, folder, tmp_path / "e.npy", workers=0, shard_size=16, progress=False)
    a, na, _ = load_embeddings(tmp_path / "e.parquet")
    b, nb_, _ = load_embeddings(tmp_path / "e.npy")
    assert na == nb_ and np.array_equal(a, b)
    assert neighbors(tmp_path / "e.parquet", 0, k=1) == neighbors(tmp_path / "e.npy", 0, k=1)
    assert neighbors(tmp_path / "e.parquet", 0, k=1)[0]["file"] != na[0]             # the query is left out
