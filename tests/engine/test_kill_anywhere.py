"""Kill anywhere: a real tiny CPU pretraining (the ``selfsight pretrain`` command) is SIGKILLed at
seeded random moments (during start-up or resume, between steps, in the middle of a checkpoint
write) over 10 trials and resumed each time. After every kill the latest checkpoint loads and no
more than one checkpoint interval of steps is lost; the final weights and every logged loss equal
those of an uninterrupted run (deterministic mode). SIGTERM and SIGINT (pre-emption) write a
checkpoint and exit cleanly.

The runs are processes forked from a forkserver that has imported selfsight once (a fresh
interpreter costs seconds of imports per start on a loaded 2-core machine); each one runs the
CLI's ``main`` in its own process, with its own signals and exit code.
"""
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

from selfsight.files import safe_load

STEPS, EVERY = 64, 4
WRITE_DELAY = 0.25         # SELFSIGHT_TEST_CHECKPOINT_DELAY: the window between fsync and os.replace


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["selfsight.cli", "selfsight.engine.trainer", "selfsight.methods"])
    return ctx


def _main(argv: list[str], env: dict, log: str) -> None:
    """A run in its own process: the CLI's main, output to ``log``, its return code as exit code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    from selfsight.cli import main
    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(rc)


def argv(out: Path, steps: int = STEPS, every: int = EVERY) -> list[str]:
    return ["pretrain", "--method", "simclr", "--data", "fashion-mnist", "--steps", str(steps), "--out", str(out),
            "--auto-resume", *tiny_overrides(**{"train.deterministic": "true", "train.checkpoint_every": every,
                                           "train.log_every": 1, "train.threads": 1})]


def start(ctx, args: list[str], log: Path, **env):
    p = ctx.Process(target=_main, args=(args, {k: str(v) for k, v in env.items()}, str(log)))
    p.start()
    return p


def rows(run: Path, live: bool = False) -> list[dict]:
    """The metric rows; ``live``: of a running process, whose last line may be half-read."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    if live and not text.endswith("\n"):
        text = text.rpartition("\n")[0]
    return [json.loads(x) for x in text.splitlines()]             # after a kill: no torn line


def wait_until(cond, proc, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond() and proc.is_alive() and time.time() < deadline:
        time.sleep(0.002)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_at_most_one_interval_and_resumes_exactly(tmp_path):
    ctx = _context()
    ref, run = tmp_path / "ref", tmp_path / "killed"
    reference = start(ctx, argv(ref), tmp_path / "ref.log")            # runs beside the kill trials
    ck = run / "checkpoint.pt"
    rng = random.Random(2026)
    kinds = ["write"] * 4 + ["step"] * 4 + ["early"] * 2              # 10 trials
    rng.shuffle(kinds)
    env = {"SELFSIGHT_TEST_CHECKPOINT_DELAY": WRITE_DELAY}
    saved, hit_write = 0, 0
    for trial, kind in enumerate(kinds):
        proc = start(ctx, argv(run), tmp_path / f"trial{trial}.log", **env)
        if kind == "write":       # SIGKILL while the temporary checkpoint file exists
            wait_until(lambda: any(run.glob(".checkpoint.pt.*.tmp")), proc)
            hit_write += any(run.glob(".checkpoint.pt.*.tmp"))
            time.sleep(rng.uniform(0, 0.8 * WRITE_DELAY))
        elif kind == "step":      # between or inside steps, up to two intervals past the checkpoint
            target = saved + rng.randint(1, 2 * EVERY)
            wait_until(lambda: max((r["step"] for r in rows(run, live=True)), default=0) >= target, proc)
            time.sleep(rng.uniform(0, 0.05))
        else:                     # start-up: imports, data, building, loading the checkpoint
            time.sleep(rng.uniform(0, 0.3))
        assert proc.is_alive(), f"trial {trial}: the run ended before the kill ({kind})"
        proc.kill()
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        if not ck.exists():
            continue
        state = safe_load(ck)                          # the latest checkpoint always loads
        assert state["step"] % EVERY == 0 and state["step"] >= saved, (trial, kind, state["step"], saved)
        saved = state["step"]
        logged = max(r["step"] for r in rows(run))
        assert logged - saved <= EVERY, f"trial {trial} ({kind}): {logged - saved} steps lost"
    assert hit_write >= 3 and 0 < saved < STEPS

    final = start(ctx, argv(run), tmp_path / "final.log", **env)
    final.join(300)
    reference.join(300)
    assert final.exitcode == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert reference.exitcode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert not list(run.glob(".checkpoint.pt.*.tmp"))                  # a killed writer's file is cleaned up
    a = {r["step"]: r["loss"] for r in rows(ref)}
    b = {r["step"]: r["loss"] for r in rows(run)}                      # a resumed step overwrites the killed one
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert all(b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7) for s in a)
    wa, wb = safe_load(ref / "checkpoint.pt"), safe_load(ck)
    assert wb["step"] == wa["step"] == STEPS and wa["model"].keys() == wb["model"].keys()
    for k in wa["model"]:
        torch.testing.assert_close(wb["model"][k], wa["model"][k], rtol=1e-6, atol=1e-7, msg=f"final weight {k}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_preemption_signal_writes_a_checkpoint_and_exits_with_the_signal_code(tmp_path, sig):
    ctx = _context()
    run, log = tmp_path / "pre-empted", tmp_path / "run.log"
    proc = start(ctx, argv(run, steps=100000, every=3), log)
    wait_until(lambda: (run / "checkpoint.pt").exists(), proc)
    time.sleep(0.05)
    os.kill(proc.pid, sig)
    proc.join(120)
    out = log.read_text()
    assert proc.exitcode == 128 + sig, out[-3000:]             # 130 / 143: not success, so `pretrain && eval` stops
    result = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    assert result["stopped_by_signal"] is True and result["signal"] == sig
    step = safe_load(run / "checkpoint.pt")["step"]
    assert 3 <= step < 100000 and step == result["steps"]
    assert step == max(r["step"] for r in rows(run))           # nothing trained after the checkpoint is lost
