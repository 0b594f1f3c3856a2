"""A run killed (SIGKILL) after a checkpoint and resumed produces the same next losses and the
same final weights as an uninterrupted run (CPU, deterministic mode)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

ARGS = tiny_overrides(**{"train.deterministic": "true", "train.checkpoint_every": 10, "train.log_every": 1,
                         "train.threads": 1})


STEPS = 30             # a checkpoint every 10 steps: killed after step 10 or 20, resumed to 30
METHOD_ARGS = {"simclr": [], "mocov2": ["method.queue_size=256"],     # MoCo: the queue must resume too
               # DINO: the center, the teacher and the frozen last layer (free from step 19 of 30) too
               "dino": ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
                        "views.local_crops=2", "views.local_size=12", "method.freeze_last_layer=0.01"],
               # DINOv2: both centers, the masks, the teacher, KoLeo and the layer-wise learning rates too
               "dinov2": ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
                          "backbone.name=vit_tiny", "backbone.patch_size=7", "backbone.depth=1", "views.size=28",
                          "views.local_crops=2", "views.local_size=14", "method.freeze_last_layer=0.01",
                          "method.centering=center"],     # the recipe's Sinkhorn-Knopp keeps no center to resume
               # I-JEPA: the target encoder, its EMA and the multi-block masks drawn per step
               "ijepa": ["backbone.name=vit_tiny", "backbone.patch_size=4", "backbone.depth=1", "views.size=28",
                         "method.predictor_dim=32", "method.predictor_depth=1", "method.predictor_heads=2"],
               # distill: the frozen teacher (a checked-in tiny MoCo v2 run) is reloaded, not checkpointed
               "distill": [f"method.teacher={Path(__file__).parent / 'old_run'}"]}


def cli(out: Path, *extra: str, method: str = "simclr") -> list[str]:
    args = ARGS if method in ("simclr", "mocov2") else tiny_overrides(**{
        "method.name": method, "train.deterministic": "true", "train.checkpoint_every": 10, "train.log_every": 1,
        "train.threads": 1})
    return [sys.executable, "-m", "selfsight", "pretrain", "--method", method, "--data", "fashion-mnist",
            "--steps", str(STEPS), "--out", str(out), *extra, *args, *METHOD_ARGS[method]]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}          # a resumed step overwrites the killed run's


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "mocov2", "dino", "dinov2", "distill"])
def test_killed_run_resumes_exactly(tmp_path, method):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref = tmp_path / "ref"
    subprocess.run(cli(ref, method=method), check=True, env=env, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(cli(run, method=method), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = run / "checkpoint.pt"
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists(), "no checkpoint was written before the kill"
    killed_at = torch.load(ck, weights_only=True)["step"]
    assert killed_at < STEPS

    done = subprocess.run(cli(run, "--resume", method=method), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = losses(ref), losses(run)
    later = [s for s in a if s > killed_at]
    assert later and all(b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7) for s in later)
    wa = torch.load(ref / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    if method == "mocov2":                  # the queue (256 rows: all written over 30 steps of 32) and its pointer
        assert int(wb["queue_ptr"]) == int(wa["queue_ptr"])
        torch.testing.assert_close(wb["queue"], wa["queue"], rtol=1e-6, atol=1e-7)
    if method in ("dino", "dinov2"):
        assert bool(wa["center"].abs().sum() > 0)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7, msg=f"final weight {k}")


def test_existing_run_without_resume_is_refused(tmp_path):
    run = tmp_path / "r"
    first = subprocess.run(cli(run)[:-len(ARGS)] + tiny_overrides(**{"train.steps": 2}), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cli(run)[:-len(ARGS)] + tiny_overrides(**{"train.steps": 2}), capture_output=True, text=True)
    assert again.returncode == 2
    assert "--resume" in again.stderr and "Traceback" not in again.stderr


def test_sigterm_writes_a_checkpoint_and_exits_with_code_143(tmp_path):
    run = tmp_path / "pre-empted"
    cmd = cli(run)[:-len(ARGS)] + tiny_overrides(**{"train.steps": 100000, "train.checkpoint_every": 5,
                                                    "train.log_every": 1})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]        # pre-empted, not finished
    assert json.loads(out.strip().splitlines()[-1])["stopped_by_signal"] is True
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 5 <= step < 100000
    last_logged = max(losses(run))
    assert step == last_logged                            # nothing trained after the last checkpoint is lost
