"""Distributed faults: under ``torchrun --max-restarts 1`` with 2 gloo processes, rank 1 dies
(``os._exit``, as a lost node) at step 6; the job restarts and resumes from the checkpoint of
step 4, and its final state equals that of an uninterrupted 2-process run: MoCo v2's queue, queue
pointer and momentum key encoder, DINO's center and EMA teacher, every weight: the queue, center
and EMA state were saved and resumed exactly."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

from selfsight.files import safe_load

EXTRA = {"mocov2": {"method.queue_size": 64}, "dino": {"method.out_dim": 256, "method.hidden_dim": 64,
                                                     "method.bottleneck_dim": 32}}


def torchrun(out, env: dict, restarts: int, method: str = "mocov2"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.1", "-m", "selfsight", "pretrain",
           "--method", method, "--data", "fashion-mnist", "--steps", "8", "--out", str(out), "--auto-resume",
           *tiny_overrides(**{"method.name": method, "train.checkpoint_every": 4, "train.log_every": 1,
                              "train.deterministic": "true", "data.batch_size": 16, **EXTRA[method]})]
    log = open(f"{out}.log", "w")          # a file, not a pipe: two jobs run side by side
    # a fresh rendezvous store per restart: with the agent's shared store, restarted gloo workers can
    # read the dead group's addresses and wait on them (most restarts in our runs, torch 2.14; docs/guarantees.md)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONHASHSEED": "0", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                                 **env}), log


def wait(p: subprocess.Popen, log) -> None:
    try:
        p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)         # the agent and its workers: nothing is left behind
        p.wait()
    log.close()


def finish(job, out, env: dict, restarts: int, method: str) -> str:
    p, log = job
    wait(p, log)
    text = open(f"{out}.log").read()
    if p.returncode != 0 and "terminate called without an active exception" in text:
        # gloo's TCP transport once aborted a worker at start-up on a loaded 2-core CI machine (see
        # tests/test_cli.py): one fresh try; a real bug fails it again
        shutil.rmtree(out, ignore_errors=True)
        crash = env.get("SELFSIGHT_TEST_CRASH")
        if crash:                                   # the retry must crash again: forget the first crash
            Path(crash.split(":", 2)[2]).unlink(missing_ok=True)
        p, log = torchrun(out, env, restarts, method)
        wait(p, log)
        text = open(f"{out}.log").read()
    assert p.returncode == 0, text[-4000:]
    return text


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "dino"])
def test_a_rank_killed_mid_run_restarts_and_resumes_exactly(tmp_path, method):
    marker = tmp_path / "crashed"
    crash_env = {"SELFSIGHT_TEST_CRASH": f"1:6:{marker}"}          # rank 1 dies fetching the batch of step 6
    ref, run = tmp_path / "ref", tmp_path / "crash"
    procs = [(torchrun(ref, {}, 0, method), ref, {}, 0), (torchrun(run, crash_env, 1, method), run, crash_env, 1)]
    logs = [finish(*p, method) for p in procs]
    assert marker.exists(), "rank 1 never crashed"
    assert "resumed from" in logs[1] and "at step 4" in logs[1], logs[1][-4000:]
    a, b = safe_load(ref / "checkpoint.pt"), safe_load(run / "checkpoint.pt")
    assert a["step"] == b["step"] == 8 and b["meta"]["world_size"] == 2
    assert a["model"].keys() == b["model"].keys()
    if method == "mocov2":
        assert int(a["model"]["queue_ptr"]) == int(b["model"]["queue_ptr"]) == 0      # 8 steps x 16 keys = 2 x 64
        assert any(k.startswith("key_student.") for k in a["model"])
    else:
        assert "center" in a["model"] and a["model"]["center"].abs().sum() > 0        # the center moved
        assert any(k.startswith("teacher") for k in a["model"])
    for k in a["model"]:                      # queue / center, EMA encoder or teacher, student, BN statistics
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-6, atol=1e-7, msg=f"final state {k}")
