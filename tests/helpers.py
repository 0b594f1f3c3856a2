"""Helpers the tests share (fixtures live in ``conftest.py``): the tiny run config, real-image
views, a small kNN, running a function on 2 gloo processes, and the host-wait detector."""
from __future__ import annotations

from pathlib import Path

import torch


def normalized(dataset) -> torch.Tensor:
    """The images of an array data set as floats normalized with mean 0.5, std 0.5 (N×C×H×W in [-1, 1])."""
    return (dataset.images.float() / 255 - 0.5) / 0.5


TINY = {"backbone.name": "resnet10", "backbone.width": 8, "backbone.small_stem": "s2", "views.size": 28,
        "data.batch_size": 32, "train.precision": "fp32", "train.progress": "false", "train.tensorboard": "false",
        "optim.name": "sgd", "optim.lr": 0.06, "optim.base_batch": 128, "optim.weight_decay": 5e-4,
        "optim.warmup_epochs": 0}
TINY_METHOD = {"temperature": 0.5}      # method fields set where the method has them (its parameter dataclass)
VIT = {"backbone.name": "vit_tiny", "backbone.patch_size": 4, "backbone.depth": 1, "views.size": 28}
# each method small enough for a one-step test (heads, queues, a 1-block ViT)
SMALL_METHOD = {"dino": {"method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16},
                "ibot": {**VIT, "method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16},
                "dinov2": {**VIT, "method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16},
                "ijepa": {**VIT, "method.predictor_dim": 32, "method.predictor_depth": 1, "method.predictor_heads": 2},
                "distill": {"method.teacher": str(Path(__file__).parent / "engine" / "old_run")},  # a tiny MoCo v2 run
                "mocov1": {"method.queue_size": 64}, "mocov2": {"method.queue_size": 64},
                "tokenizer": {"method.vocab_size": 16, "method.hidden": 8, "method.dim": 8},
                **{m: {**VIT, "method.head.decoder_dim": 16, "method.head.decoder_depth": 1,
                       "method.head.decoder_heads": 2} for m in ("mim", "mae")},
                "maskfeat": {**VIT, "method.target.hog_cell": 4}}


def tiny_overrides(**extra) -> list[str]:
    """A run small enough for tests: resnet10 of width 8 on 28 px views, fp32; the method's own
    fields of ``TINY_METHOD`` where its parameter dataclass has them."""
    from dataclasses import fields

    from selfsight.methods import METHODS
    params = {f.name for f in fields(METHODS.get(extra.get("method.name", "simclr")).params)}
    base = {**TINY, **{f"method.{k}": v for k, v in TINY_METHOD.items() if k in params}, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def small_knn(run, bank_set, test_set, n_test: int = 1000) -> dict:
    """kNN top-1 (k 20, T 0.07) on the first ``n_test`` test images with ``bank_set`` as the bank,
    for the run's trained backbone and for the same backbone at random init."""
    from selfsight.backbones.features import backbone_features
    from selfsight.data import ArrayDataset
    from selfsight.eval.features import extract
    from selfsight.eval.knn import knn_accuracy
    from selfsight.runs import load_run
    test = ArrayDataset(test_set.images[:n_test].clone(), test_set.labels[:n_test].clone())
    acc = {}
    for name, random_init in (("random", True), ("trained", False)):
        model, _, pre = load_run(run, "cpu", random_init=random_init)
        fn = backbone_features(model.backbone)
        bank, bank_y = extract(fn, bank_set, pre, "cpu", 512)
        feats, y = extract(fn, test, pre, "cpu", 512)
        acc[name] = knn_accuracy(bank, bank_y, feats, y, 20, 0.07)["top1"]
    return acc


def _gloo_entry(rank, world, init_file, result_path, fn, args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = fn(rank, *args)
        if rank == 0:
            torch.save(out, result_path)
    finally:
        dist.destroy_process_group()


def run_on_gloo(fn, tmp_path, *args, world: int = 2, writes=()):
    """Run ``fn(rank, *args)`` in ``world`` processes joined on gloo; returns what rank 0 returned
    (``fn`` must be a module-level function; every rank must make the same collective calls).
    ``writes``: folders outside ``tmp_path`` that ``fn`` changes (run folders): a retry finds them as
    they were before the first try."""
    import shutil

    import torch.multiprocessing as mp
    snapshots = []                        # (folder, its copy, or None where it did not exist yet)
    for i, folder in enumerate(map(Path, writes)):
        snapshot = tmp_path / f"snapshot-{i}" if folder.exists() else None
        if snapshot is not None:
            shutil.copytree(folder, snapshot)
        snapshots.append((folder, snapshot))
    before = set(tmp_path.iterdir())
    for attempt in range(2):
        if attempt:                       # the retry starts clean: what the aborted try wrote goes
            for p in set(tmp_path.iterdir()) - before:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            for folder, snapshot in snapshots:
                shutil.rmtree(folder, ignore_errors=True)
                if snapshot is not None:
                    shutil.copytree(snapshot, folder)
        try:
            mp.spawn(_gloo_entry, args=(world, str(tmp_path / f"gloo-init-{attempt}"), str(tmp_path / "rank0.pt"),
                                        fn, args), nprocs=world, join=True)
            break
        except mp.ProcessExitedException as e:
            # gloo's TCP transport sometimes aborts a worker from C++ ("terminate called without an
            # active exception", SIGABRT, no Python error) on a loaded 2-core machine (also seen in
            # tests/faults/test_fault_distributed.py): one fresh try; a real bug fails it again
            if e.signal_name != "SIGABRT" or attempt:
                raise
    return torch.load(tmp_path / "rank0.pt", weights_only=True)


def fmnist_view_pair(fmnist_small, n: int = 16) -> list:
    """Two float64 views of the first ``n`` real images (fixed seed), for equivalence tests."""
    from selfsight.augment import BatchedViews, ViewRecipe
    recipe = ViewRecipe(size=28, crop_scale=(0.3, 1.0), mean=(0.5,), std=(0.5,))
    return [v.double() for v in BatchedViews(recipe, torch.Generator().manual_seed(1))(fmnist_small.images[:n])]


class HostWaits:
    """What would make the host wait for an accelerator, recorded while code runs on the ``meta``
    device (no accelerator needed): uploads of host memory that are not ``non_blocking`` (PyTorch
    copies, then synchronises the stream), ``torch.tensor(..., device=...)`` (the same upload) and
    reads of a device value (``.item()``, ``bool()``, ``nonzero``). ``found``: one line per event,
    with the innermost selfsight frame that caused it. ``reads_on_cpu``: reads of CPU tensors count
    too (code that runs on the CPU here and on a GPU elsewhere, e.g. a fused optimizer, which the
    ``meta`` device lacks)."""

    def __init__(self, reads_on_cpu: bool = False):
        self.found: list[str] = []
        self.reads_on_cpu = reads_on_cpu

    def _note(self, what: str) -> None:
        import traceback
        frames = [f for f in traceback.extract_stack() if "/selfsight/" in f.filename.replace("\\", "/")]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        self.found.append(f"{what} at {where}")

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        aten, waits = torch.ops.aten, self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is aten._to_copy.default:
                    dev = kwargs.get("device")
                    if args[0].device.type == "cpu" and dev is not None and dev.type != "cpu" \
                            and not kwargs.get("non_blocking", False):
                        waits._note(f"blocking upload of {tuple(args[0].shape)}")
                elif func is aten.copy_.default:
                    dst, src = args[0], args[1]
                    blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
                    if src.device.type == "cpu" and dst.device.type != "cpu" and blocking:
                        waits._note(f"blocking upload of {tuple(src.shape)}")
                elif func in (aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default) \
                        and (args[0].device.type != "cpu" or waits.reads_on_cpu):
                    waits._note(f"read back ({func.overloadpacket.__name__})")
                return func(*args, **kwargs)

        def creating(fn):
            def wrapper(*args, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and torch.device(dev).type != "cpu":
                    waits._note(f"{fn.__name__}(..., device={dev}) (an upload)")
                return fn(*args, **kwargs)
            return wrapper
        self._saved = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
        for name, fn in self._saved.items():
            setattr(torch, name, creating(fn))
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, fn in self._saved.items():
            setattr(torch, name, fn)
        return False


def cifar_samples():
    """The 40 real CIFAR-10/100 test images (32×32 RGB PNGs) foolbox's wheel ships, as an
    ``ArrayDataset`` labeled by their set (0: CIFAR-10, 1: CIFAR-100); skips when foolbox is missing."""
    import importlib.util

    import numpy as np
    import pytest
    from PIL import Image

    from selfsight.data import ArrayDataset
    spec = importlib.util.find_spec("foolbox")  # locate only: importing foolbox is slow
    files = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("cifar*.png")) if spec else []
    if not files:
        pytest.skip("no real RGB test images: install foolbox (scripts/install.sh --test)")
    images = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)
    labels = torch.tensor([0 if f.name.startswith("cifar10_") else 1 for f in files])
    return ArrayDataset(images.contiguous(), labels, name="cifar-samples")
