"""VectorQuantizer on 2 gloo processes: k-means initialisation on rank 0 broadcast to every rank
(methods.md pitfall 20), the EMA update with all-reduced statistics equal to one process with the
global batch, and dead-code restarts identical on every rank."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import run_on_gloo
from selfsight.tokenizers import VectorQuantizer

WORLD, K, D = 2, 16, 8


def gather_state(vq: VectorQuantizer) -> dict:
    out = {}
    for name, t in vq.state_dict().items():
        parts = [torch.empty_like(t.float()) for _ in range(WORLD)]
        dist.all_gather(parts, t.float().contiguous())
        out[name] = torch.stack(parts)
    return out


def _worker_kmeans(rank, data):
    # different data AND different random streams on the two ranks
    torch.manual_seed(100 + rank)
    direct = VectorQuantizer(K, D, kmeans_iters=5)
    direct.kmeans_init_(F.normalize(data[rank], dim=1))
    torch.manual_seed(200 + rank)
    vq = VectorQuantizer(K, D, kmeans_iters=5).train()
    z = data[rank].view(4, 5, 5, D).permute(0, 3, 1, 2)
    vq(z)                                                   # k-means + EMA step + restarts
    vq(z * -1.0)                                            # one more step
    return {"direct": gather_state(direct), "forward": gather_state(vq)}


def kmeans_data() -> torch.Tensor:
    data = torch.randn(WORLD, 100, D, generator=torch.Generator().manual_seed(0))
    data[1] = data[1] * 3 + 2                               # rank 1 sees other data
    return data


def test_kmeans_init_is_rank0s_and_identical_on_every_rank(gloo_results):
    data = kmeans_data()
    got = gloo_results["kmeans"]
    for phase in ("direct", "forward"):
        for name, both in got[phase].items():
            assert torch.equal(both[0], both[1]), f"{phase}: {name} differs between the ranks"
    # the broadcast codebook is rank 0's k-means (same seed in one process), counts × world
    torch.manual_seed(100)
    ref = VectorQuantizer(K, D, kmeans_iters=5)
    ref.kmeans_init_(F.normalize(data[0], dim=1))
    torch.testing.assert_close(got["direct"]["codebook"][0], ref.codebook)
    torch.testing.assert_close(got["direct"]["cluster_size"][0], ref.cluster_size * WORLD)
    assert got["forward"]["initialised"].all()


def _one_ema_run(rank, z, state, l2_norm):
    b = z.shape[0] // WORLD
    vq = VectorQuantizer(K, D, decay=0.8, dead_threshold=0.0, l2_norm=l2_norm).train()
    vq.load_state_dict(state)
    for step in range(3):
        vq(z[rank * b:(rank + 1) * b] * (1 + step))
    out = {k: v.clone() for k, v in vq.state_dict().items()}
    # restarts: kill codes 2 and 5 (copies of code 0: ties go to 0, so no vector picks them);
    # rank 0's vectors replace them on every rank
    torch.manual_seed(rank)
    vq.dead_threshold = 0.01
    with torch.no_grad():
        vq.cluster_size[[2, 5]] = 0.0
        vq.codebook[[2, 5]] = vq.codebook[0].clone()
    res = vq(z[rank * b:(rank + 1) * b])
    return {"ema": out, "restart": gather_state(vq), "restarted": res.restarted}


def _worker(rank, kmeans_data, z, states):
    """One spawn for both tests (starting 2 processes costs seconds)."""
    return {"kmeans": _worker_kmeans(rank, kmeans_data),
            "ema": {l2_norm: _one_ema_run(rank, z, state, l2_norm) for l2_norm, state in states.items()}}


def ema_setup() -> tuple:
    torch.manual_seed(0)
    z = torch.randn(8, D, 3, 3)
    models, states = {}, {}
    for l2_norm in (True, False):
        vq = VectorQuantizer(K, D, decay=0.8, dead_threshold=0.0, l2_norm=l2_norm).train()
        with torch.no_grad():
            cb = torch.randn(K, D)
            vq.codebook.copy_(F.normalize(cb, dim=1) if l2_norm else cb)
            vq.cluster_size.copy_(torch.rand(K) * 4 + 1)
            vq.embed_sum.copy_(vq.codebook * vq.cluster_size[:, None])
            vq.initialised.fill_(True)
        models[l2_norm], states[l2_norm] = vq, {k: v.clone() for k, v in vq.state_dict().items()}
    return z, models, states


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    z, _, states = ema_setup()
    return run_on_gloo(_worker, tmp_path_factory.mktemp("gloo"), kmeans_data(), z, states, world=WORLD)


def test_ema_on_two_processes_equals_one_process_with_the_global_batch(gloo_results):
    z, models, _ = ema_setup()
    for l2_norm, vq in models.items():
        got = gloo_results["ema"][l2_norm]
        for step in range(3):
            vq(z * (1 + step))                                # one process, the whole batch
        for name in ("cluster_size", "embed_sum", "codebook"):
            torch.testing.assert_close(got["ema"][name], getattr(vq, name), msg=f"l2_norm={l2_norm}: {name}")
        assert got["restarted"].item() == 2.0
        for name, both in got["restart"].items():
            assert torch.equal(both[0], both[1]), f"restart: {name} differs between the ranks"
        zf0 = z[:4].permute(0, 2, 3, 1).reshape(-1, D)     # rank 0's vectors
        zf0 = F.normalize(zf0, dim=1) if l2_norm else zf0
        cb = got["restart"]["codebook"][0]
        assert torch.cdist(cb[[2, 5]], zf0, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-5
