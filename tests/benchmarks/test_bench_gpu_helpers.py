"""The measuring parts of benchmarks/gpu_throughput.py, scaling.py and throughput_vs_lightly.py (never timings)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_throughput as gt  # noqa: E402
import scaling  # noqa: E402
from helpers import tiny_overrides  # noqa: E402


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0), ("NVIDIA L4", 121.0),
                                        ("NVIDIA L40S", 362.0), ("Some Future GPU", None)])
def test_peak_table_matches_the_specific_name_first(name, peak):
    assert gt.peak_tflops(name, 0.0) == peak
    assert gt.peak_tflops(name, 123.0) == 123.0                  # --peak-tflops wins


def test_timed_window_skips_warmup_and_weights_rows_by_their_steps(tmp_path):
    rows = [{"step": 2, "images_per_s": 1.0, "data_wait": 0.9},       # warm-up: ignored
            {"step": 4, "images_per_s": 20.0, "data_wait": 0.5},      # 2 steps of 10 images: 1 s, 0.5 s waiting
            {"step": 5, "images_per_s": 5.0, "data_wait": 0.0}]       # 1 step: 2 s
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    w = gt.timed_window(path, warmup=2, batch=10)
    assert w["steps"] == 3 and w["seconds"] == pytest.approx(3.0) and w["wait"] == pytest.approx(0.5)
    assert w["aug"] == 0.0                                            # rows without augment_share


def test_loader_throughput_counts_the_images_the_workers_deliver(tmp_path):
    import loader_throughput as lt

    from selfsight.resolve import load_config
    root = gt.make_jpeg_folder(str(tmp_path / "jpegs"), 48, 64, 96, procs=1)
    cfg = load_config(overrides=gt.RECIPES["simclr_r50"].tiny + [f"data.train={root}", "data.batch_size=8",
                                                                 "views.preset=imagenet"])
    assert lt.images_per_s(cfg, 1, 3) > 0                             # 1 worker: 1 warm-up + 3 timed batches
    with pytest.raises(SystemExit, match="fewer than"):
        lt.images_per_s(cfg, 4, 3)                                    # 6 batches < 4 warm-up + 3 timed


def test_jpeg_folder_is_real_images_the_folder_dataset_reads(tmp_path, monkeypatch):
    from selfsight.data import build_dataset
    root = gt.make_jpeg_folder(str(tmp_path / "jpegs"), 12, 64, 96, procs=1)
    files = sorted(Path(root).rglob("*.jpg"))
    assert len(files) == 12
    ds = build_dataset(root)
    assert len(ds) == 12
    sizes = set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["skipped"] == 0
        w, h = item["image"].size
        assert 64 <= min(w, h) <= 96
        sizes.add((w, h))
    assert len(sizes) > 1                                           # random crops, not one picture repeated


def test_step_flops_grow_with_the_batch_and_match_a_plain_count(fmnist_small, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    from selfsight.engine.trainer import Trainer
    from selfsight.resolve import load_config
    flops = {}
    for b in (16, 32):
        cfg = load_config(overrides=tiny_overrides(**{"method.name": "simclr", "data.batch_size": b,
                                                      "train.steps": 1}))
        tr = Trainer(cfg, tmp_path / f"b{b}", dataset=fmnist_small)
        flops[b] = gt.step_flops(tr)
        assert all(p.grad is None for p in tr.model.parameters())    # no gradient left behind
    assert flops[32] == pytest.approx(2 * flops[16], rel=0.05)
    # forward + backward of the backbone alone is most of it, and backward ~ 2x forward
    x = torch.randn(32 * 2, 1, 28, 28)
    with FlopCounterMode(display=False) as c:
        tr.model.backbone(x).sum().backward()
    assert 0.8 < c.get_total_flops() / flops[32] <= 1.0


def test_scaling_expectations():
    assert scaling.expected("batch", 256, 64, {}, {}) == 4
    assert scaling.expected("size", 96, 32, {}, {}) == 9
    assert scaling.expected("crops", 8, 0, {}, {}) == pytest.approx(1.75)
    assert scaling.expected("mask", 0.9, 0.75, {"visible_tokens": 6}, {"visible_tokens": 16}) == 6 / 16


def test_host_syncs_are_counted_per_site_and_bookkeeping_apart():
    """``--syncs``: the counter's bookkeeping marks and its row (the CUDA debug mode itself is not
    available here, so warnings are fed to it as the mode would raise them)."""
    class FakeLog:
        def flush(self):
            counter._seen("called a synchronizing CUDA operation", UserWarning, "/x/logs.py", 95)

    class FakeTrainer:
        step = 0
        log = FakeLog()

        def _step(self, *a):
            pass

        def _read_counters(self):
            pass

        def save(self):
            counter._seen("called a synchronizing CUDA operation", UserWarning, "/x/checkpoint.py", 9)

        def write_pictures(self):
            pass
    tr = FakeTrainer()
    counter = gt._HostSyncs(tr, start=5)
    for _ in range(2):
        counter._seen("called a synchronizing CUDA operation", UserWarning, "/x/momentum.py", 44)
    counter._seen("something else", UserWarning, "/x/a.py", 1)
    tr.log.flush()
    tr.save()
    row = counter.row(steps=4)
    assert row == {"host_syncs_per_step": 0.5, "host_sync_sites": [("momentum.py:44", 2)], "log_row_syncs": 2}
    base = {"label": "DINO", "family": "vit", "batch": 8, "images_per_s": 1.0, "step_ms": 1.0, "data_wait": 0.0,
            "peak_mem_gb": 1.0, "gflop_per_step": 1.0, "mfu": None}
    text = gt.markdown([{**base, **row}], "head")
    assert "DINO: 0.50 host syncs per step outside the bookkeeping (sites: momentum.py:44 (2)); 2 in " in text


def test_lightly_benchmark_ratios_pair_rounds_and_skip_missing_values():
    """throughput_vs_lightly.py: each round's row over the same round's lightly row, median and range;
    ``--ceiling`` rows compare step alone with step alone."""
    import throughput_vs_lightly as tl
    rows = [{"images_per_s": 300.0, "alone_images_per_s": 330.0}, None, {"images_per_s": 200.0}]
    ref = [{"images_per_s": 150.0, "alone_images_per_s": 300.0}, {"images_per_s": 100.0},
           {"images_per_s": 200.0, "alone_images_per_s": 250.0}]
    assert tl._ratios(rows, ref, "images_per_s") == "1.50x (1.00-2.00)"
    assert tl._ratios(rows, ref, "alone_images_per_s", "alone_images_per_s") == "1.10x"
    assert tl._ratios([None], ref, "images_per_s") == "n/a"
