"""The gloo harness's one retry after a C++ abort starts from the state before the first try."""
from __future__ import annotations

import os

from helpers import run_on_gloo


def _abort_once(rank, run_dir, marker):
    """First try: rank 0 leaves a file in the run folder and aborts as gloo's transport does (SIGABRT)."""
    import torch.distributed as dist
    found = sorted(p.name for p in run_dir.iterdir())
    dist.barrier()
    if rank == 0 and not marker.exists():
        (run_dir / "checkpoint.pt").write_bytes(b"half-written")
        marker.write_text("aborted once")
        os.abort()
    return {"found": found}


def test_retry_restores_the_folders_it_was_told_about(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("kept")
    (tmp_path / "gloo").mkdir()
    out = run_on_gloo(_abort_once, tmp_path / "gloo", run_dir, marker, writes=[run_dir])
    assert marker.exists()                                  # the first try did abort
    assert out["found"] == ["config.yaml"]                  # the retry saw the folder as it was
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
