"""VectorQuantizer against references written here from the papers' formulas: nearest code
(brute force), EMA statistics (Razavi et al. 2019 Eq. 4-6 with Laplace smoothing), the
straight-through gradient and the commitment loss (van den Oord et al. 2017 Eq. 3), k-means
initialisation, dead-code restarts, state dict and autocast."""
import pytest
import torch
import torch.nn.functional as F

from selfsight.tokenizers import VectorQuantizer

K, D = 12, 6
EXACT = "donot_use_mm_for_euclid_dist"             # cdist without the |a|²-2ab+|b|² rounding


def brute_nearest(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Explicit loops: the index of the code with the smallest squared L2 distance."""
    ids = []
    for v in vectors:
        best, best_d = -1, float("inf")
        for k, e in enumerate(codebook):
            d = sum((float(a) - float(b)) ** 2 for a, b in zip(v, e))
            if d < best_d:
                best, best_d = k, d
        ids.append(best)
    return torch.tensor(ids)


def flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def make(l2_norm: bool, seed: int = 0, **kw) -> VectorQuantizer:
    torch.manual_seed(seed)
    vq = VectorQuantizer(K, D, l2_norm=l2_norm, **kw)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(K, D) * 2)
        if l2_norm:
            vq.codebook.copy_(F.normalize(vq.codebook, dim=1))
        vq.initialised.fill_(True)
    return vq


@pytest.mark.parametrize("l2_norm", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_code_quantized_value_and_commitment_match_the_formulas(l2_norm, seed):
    vq = make(l2_norm, seed, commitment=0.3).eval()
    z = torch.randn(3, D, 4, 5, generator=torch.Generator().manual_seed(seed)) * 2
    out = vq(z)
    zf = F.normalize(flat(z), dim=1) if l2_norm else flat(z)
    ref = brute_nearest(zf, vq.codebook)
    assert out.ids.shape == (3, 4, 5) and out.ids.dtype == torch.long
    assert torch.equal(out.ids.reshape(-1), ref)
    assert torch.equal(torch.cdist(zf, vq.codebook, compute_mode=EXACT).argmin(1), ref)
    if l2_norm:                                                      # = max cosine on the sphere
        assert torch.equal((zf @ vq.codebook.t()).argmax(1), ref)
    q = vq.codebook[ref]
    torch.testing.assert_close(flat(out.quantized), q)               # forward value = the code
    assert out.quantized.shape == z.shape
    commit = 0.3 * ((zf - q) ** 2).sum() / zf.numel()
    torch.testing.assert_close(out.commit_loss, commit)
    counts = torch.bincount(ref, minlength=K).float()
    p = counts / counts.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    torch.testing.assert_close(out.perplexity, ent.exp())
    torch.testing.assert_close(out.usage, (counts > 0).float().mean())
    assert torch.equal(vq.nearest(flat(z)), ref)                     # the pure assignment
    torch.testing.assert_close(vq.lookup(out.ids), out.quantized)


@pytest.mark.parametrize("l2_norm", [False, True])
def test_straight_through_gradient_and_commitment_gradient(l2_norm):
    vq = make(l2_norm, 3, commitment=0.25).eval()
    z = (torch.randn(2, D, 3, 3) * 2).requires_grad_()
    w = torch.randn(2, D, 3, 3)
    out = vq(z)
    q = out.quantized
    q.retain_grad()
    (q.pow(3) * w).sum().backward()                                  # any function of q
    zn = F.normalize(z.detach(), dim=1) if l2_norm else z.detach()
    torch.testing.assert_close(q.detach(), vq.lookup(out.ids))
    if l2_norm:         # d/dz = (d normalize/dz)^T · dL/dq: the gradient is copied to the normalized z
        z2 = z.detach().clone().requires_grad_()
        ref, = torch.autograd.grad(F.normalize(z2, dim=1), z2, grad_outputs=q.grad)
    else:
        ref = q.grad
    torch.testing.assert_close(z.grad, ref)
    assert q.grad.abs().sum() > 0
    # commitment: beta · mean (z - sg(q))^2, gradient 2·beta·(z - q)/numel, none through q
    z.grad = None
    out = vq(z)
    out.commit_loss.backward()
    qv = vq.lookup(out.ids)
    zz = z.detach().clone().requires_grad_()
    zref = F.normalize(zz, dim=1) if l2_norm else zz
    (0.25 * ((zref - qv) ** 2).mean()).backward()
    torch.testing.assert_close(z.grad, zz.grad)
    if not l2_norm:
        torch.testing.assert_close(z.grad, 2 * 0.25 * (z.detach() - qv) / z.numel())


def ema_reference(vq_before: dict, zf: torch.Tensor, decay: float, eps: float, l2_norm: bool) -> dict:
    """Razavi et al. 2019 Eq. 4-6, Laplace smoothing as in Sonnet's VectorQuantizerEMA."""
    cb, n_ema, m_ema = vq_before["codebook"], vq_before["cluster_size"], vq_before["embed_sum"]
    ids = brute_nearest(zf, cb)
    n_batch = torch.zeros(K)
    s_batch = torch.zeros(K, D)
    for i, k in enumerate(ids.tolist()):
        n_batch[k] += 1
        s_batch[k] += zf[i]
    n_new = decay * n_ema + (1 - decay) * n_batch
    m_new = decay * m_ema + (1 - decay) * s_batch
    total = n_new.sum()
    smoothed = (n_new + eps) / (total + K * eps) * total
    e = m_new / smoothed[:, None]
    if l2_norm:
        e = e / e.norm(dim=1, keepdim=True)
    return {"codebook": e, "cluster_size": n_new, "embed_sum": m_new}


@pytest.mark.parametrize("l2_norm", [False, True])
def test_ema_update_of_counts_sums_and_codebook_matches_the_formula(l2_norm):
    vq = make(l2_norm, 4, decay=0.9, eps=1e-3, dead_threshold=0.0).train()
    with torch.no_grad():
        vq.cluster_size.copy_(torch.rand(K) * 5 + 0.5)
        vq.embed_sum.copy_(vq.codebook * vq.cluster_size[:, None])
    z = torch.randn(4, D, 3, 3, generator=torch.Generator().manual_seed(5)) * 2
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    zf = F.normalize(flat(z), dim=1) if l2_norm else flat(z)
    ref = ema_reference(before, zf, 0.9, 1e-3, l2_norm)
    out = vq(z)
    assert torch.equal(out.ids.reshape(-1), brute_nearest(zf, before["codebook"]))   # old codebook
    for name in ("cluster_size", "embed_sum", "codebook"):
        torch.testing.assert_close(getattr(vq, name), ref[name], msg=name)
    # a second step from the updated state
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    ref = ema_reference(before, zf, 0.9, 1e-3, l2_norm)
    vq(z)
    torch.testing.assert_close(vq.codebook, ref["codebook"])
    # eval mode changes nothing
    vq.eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(z * 3)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_code_never_seen_keeps_its_vector():
    vq = make(False, 6, dead_threshold=0.0).train()
    with torch.no_grad():
        vq.cluster_size.fill_(1.0)
        vq.cluster_size[0] = 0.0
        vq.embed_sum.copy_(vq.codebook * vq.cluster_size[:, None])
        vq.codebook[0] = 1e3                                     # far away: never chosen
    vq(torch.randn(2, D, 3, 3))
    assert torch.equal(vq.codebook[0], torch.full((D,), 1e3))   # not 0/Ñ = 0


def lloyd_reference(x: torch.Tensor, init: torch.Tensor, iters: int, spherical: bool) -> torch.Tensor:
    """Lloyd's k-means written out; spherical: cosine assignment and normalized means. An empty
    cluster keeps its centroid."""
    c = init.clone()
    for _ in range(iters):
        ids = brute_nearest(x, c)
        new = c.clone()
        for k in range(c.shape[0]):
            members = x[ids == k]
            if len(members):
                new[k] = members.mean(0)
                if spherical:
                    new[k] = new[k] / new[k].norm()
        c = new
    return c


@pytest.mark.parametrize("l2_norm", [False, True])
def test_kmeans_init_on_the_first_training_batch_is_lloyds_algorithm(l2_norm):
    z = torch.randn(2, D, 5, 4, generator=torch.Generator().manual_seed(2)) * 2
    zf = F.normalize(flat(z), dim=1) if l2_norm else flat(z)
    vq = VectorQuantizer(K, D, l2_norm=l2_norm, kmeans_iters=4, dead_threshold=0.0, decay=0.0).train()
    assert not bool(vq.initialised)
    torch.manual_seed(11)
    init = zf[torch.randperm(zf.shape[0])[:K]]                  # the k-means seeds the module will draw
    ref = lloyd_reference(zf, init, 4, l2_norm)
    torch.manual_seed(11)
    vq.kmeans_init_(zf)
    torch.testing.assert_close(vq.codebook, ref)
    counts = torch.bincount(brute_nearest(zf, ref), minlength=K).float()
    torch.testing.assert_close(vq.cluster_size, counts)
    torch.testing.assert_close(vq.embed_sum, ref * counts[:, None])
    # through forward: the first training batch runs k-means, then the EMA step (decay 0: the batch)
    fresh = VectorQuantizer(K, D, l2_norm=l2_norm, kmeans_iters=4, dead_threshold=0.0, decay=0.0).train()
    torch.manual_seed(11)
    out = fresh(z)
    assert bool(fresh.initialised)
    assert torch.equal(out.ids.reshape(-1), brute_nearest(zf, ref))
    torch.testing.assert_close(fresh.cluster_size, counts)
    cb = fresh.codebook.clone()
    fresh(z)                                                    # initialised: no k-means again
    torch.testing.assert_close(fresh.codebook, cb)              # (a fixed point of Lloyd's step, decay 0)


@pytest.mark.parametrize("l2_norm", [False, True])
def test_kmeans_init_finds_well_separated_clusters(l2_norm):
    torch.manual_seed(0)
    centres = torch.eye(D)[:4] * 5                               # 4 clusters (and 4 directions)
    g = torch.Generator().manual_seed(1)
    pts = centres[torch.arange(400) % 4] + 0.05 * torch.randn(400, D, generator=g)
    z = pts.view(4, 10, 10, D).permute(0, 3, 1, 2)              # B×D×h×w
    vq = VectorQuantizer(32, D, l2_norm=l2_norm, dead_threshold=0.0).train()
    out = vq(z)
    target = F.normalize(centres, dim=1) if l2_norm else centres
    d = torch.cdist(target, vq.codebook)                         # 4×32
    assert d.min(1).values.max() < 0.1                           # every centre has a code
    assert d.min(0).values.max() < 0.3                           # every code sits in a cluster
    assert out.ids.unique().numel() >= 4
    torch.testing.assert_close(vq.cluster_size.sum(), torch.tensor(400.0))


def test_kmeans_init_with_fewer_vectors_than_codes_samples_with_replacement():
    vq = VectorQuantizer(16, D, dead_threshold=0.0).train()
    z = torch.randn(1, D, 2, 3)                                  # 6 vectors, 16 codes
    vq(z)
    zf = F.normalize(flat(z), dim=1)
    # every code is one of the (normalized) vectors or a k-means mean of them
    assert torch.isfinite(vq.codebook).all()
    torch.testing.assert_close(vq.codebook.norm(dim=1), torch.ones(16))
    assert torch.cdist(zf, vq.codebook, compute_mode=EXACT).min(1).values.max() < 1e-5   # each vector: its code


@pytest.mark.parametrize("l2_norm", [False, True])
def test_dead_code_is_restarted_to_an_encoder_vector(l2_norm):
    vq = make(l2_norm, 7, decay=0.99, dead_threshold=0.01).train()
    with torch.no_grad():
        vq.cluster_size.fill_(50.0)
        vq.cluster_size[3] = 0.0                                 # dead
        vq.embed_sum.copy_(vq.codebook * vq.cluster_size[:, None])
        vq.codebook[3] = vq.codebook[0]                          # a copy of code 0: ties go to 0, never 3
    z = torch.randn(4, D, 3, 3) * 2
    out = vq(z)
    zf = F.normalize(flat(z), dim=1) if l2_norm else flat(z)
    assert out.restarted.item() == 1.0
    dist = torch.cdist(vq.codebook[3:4], zf, compute_mode=EXACT)
    assert dist.min() < 1e-5                                     # moved onto one of this batch's vectors
    mean = (vq.cluster_size.sum() - vq.cluster_size[3]) / K    # the mean before the restart (code 3 had 0)
    torch.testing.assert_close(vq.cluster_size[3], mean)                       # reset to an average code
    torch.testing.assert_close(vq.embed_sum[3], vq.codebook[3] * mean)
    assert vq(z).restarted.item() == 0.0                         # the others stay


def test_state_dict_carries_codebook_stats_and_flag():
    vq = VectorQuantizer(K, D).train()
    vq(torch.randn(2, D, 4, 4))
    sd = vq.state_dict()
    assert set(sd) == {"codebook", "cluster_size", "embed_sum", "initialised"}
    assert list(vq.parameters()) == []                           # not trained by the optimizer
    other = VectorQuantizer(K, D)
    other.load_state_dict(sd)
    assert bool(other.initialised)
    for k in sd:
        assert torch.equal(other.state_dict()[k], sd[k])
    other.train()
    cb = other.codebook.clone()
    other(torch.randn(2, D, 4, 4) * 0 + 1)                       # no k-means again: only an EMA step
    assert (other.codebook - cb).abs().max() < 0.5


def test_float32_under_autocast():
    vq = make(True, 8).eval()
    z = torch.randn(2, D, 3, 3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.quantized.dtype == torch.float32 and out.commit_loss.dtype == torch.float32
    assert torch.equal(out.ids, vq(z.float()).ids)


def test_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="B×6×h×w"):
        VectorQuantizer(K, D)(torch.randn(2, 5, 3, 3))
