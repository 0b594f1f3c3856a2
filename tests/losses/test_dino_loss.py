"""DINO loss, teacher softmax and center against references written from the paper's formulas
(Caron et al. 2021, Eq. 1-4 and Alg. 1), in float64, values and gradients."""
import math

import pytest
import torch

from selfsight.losses.dino import dino_loss, teacher_probs, update_center


def reference_loss(student, teacher_p, tau_s):
    """Explicit double sum over (teacher view i, student view v != i) pairs and over samples:
    H(P_t, P_s) = -sum_k P_t[k] log(exp(s_k / τ) / sum_j exp(s_j / τ))."""
    terms = []
    for i, t in enumerate(teacher_p):
        for v, s in enumerate(student):
            if v == i:
                continue
            per_sample = []
            for b in range(s.shape[0]):
                logz = math.log(sum(math.exp(float(x) / tau_s) for x in s[b]))
                per_sample.append(-sum(float(t[b, k]) * (float(s[b, k]) / tau_s - logz) for k in range(s.shape[1])))
            terms.append(sum(per_sample) / len(per_sample))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("n_views,n_global,b,k,tau", [(2, 2, 3, 5, 0.1), (6, 2, 4, 7, 0.1), (4, 2, 2, 9, 0.2),
                                                     (3, 1, 3, 4, 0.5)])
def test_loss_equals_the_explicit_double_sum_without_same_view_pairs(n_views, n_global, b, k, tau):
    g = torch.Generator().manual_seed(n_views * 10 + k)
    student = [torch.randn(b, k, generator=g, dtype=torch.float64) for _ in range(n_views)]
    teacher_p = [torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64) / 0.3, -1)
                 for _ in range(n_global)]
    assert dino_loss(student, teacher_p, tau).item() == pytest.approx(reference_loss(student, teacher_p, tau),
                                                                      rel=1e-10)


def test_gradient_equals_the_formula_of_the_softmax_cross_entropy():
    """d/ds_v of H(P_t, softmax(s_v/τ)) = (softmax(s_v/τ) - P_t) / τ, summed over the teachers
    that see v as another view, divided by the batch and the number of pairs."""
    g = torch.Generator().manual_seed(3)
    b, k, tau, n_views = 4, 6, 0.1, 4
    student = [torch.randn(b, k, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n_views)]
    teacher_p = [torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64), -1) for _ in range(2)]
    dino_loss(student, teacher_p, tau).backward()
    pairs = 2 * (n_views - 1)
    for v, s in enumerate(student):
        p_s = torch.softmax(s.detach() / tau, -1)
        expect = sum((p_s - t) / tau for i, t in enumerate(teacher_p) if i != v) / (b * pairs)
        torch.testing.assert_close(s.grad, expect)


def test_teacher_probabilities_are_centred_and_sharpened_and_detached():
    t = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 8, dtype=torch.float64)
    p = teacher_probs(t, c, 0.04)
    e = torch.exp((t.detach() - c) / 0.04)
    torch.testing.assert_close(p, e / e.sum(1, keepdim=True))
    assert not p.requires_grad


def test_center_is_an_ema_of_the_batch_mean_of_raw_teacher_outputs():
    c = torch.randn(1, 8, dtype=torch.float64)
    t = torch.randn(10, 8, dtype=torch.float64)
    expect = 0.9 * c + 0.1 * t.mean(0, keepdim=True)
    update_center(c, t, 0.9)
    torch.testing.assert_close(c, expect)


def test_a_non_finite_batch_leaves_the_center_unchanged():
    c = torch.randn(1, 8, dtype=torch.float64)
    before = c.clone()
    t = torch.randn(10, 8, dtype=torch.float64)
    t[3, 2] = float("nan")
    update_center(c, t, 0.9)
    torch.testing.assert_close(c, before)


def test_loss_needs_two_views():
    with pytest.raises(ValueError, match="two views"):
        dino_loss([torch.randn(2, 3)], [torch.softmax(torch.randn(2, 3), -1)], 0.1)
