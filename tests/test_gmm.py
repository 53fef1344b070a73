"""gmm.py: the Gaussian-mixture theory's closed forms against Monte Carlo."""
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import scipy.special
import scipy.stats

import gmm


def _spd(rng, d):
    A = rng.standard_normal((d, d))
    return A @ A.T / d + 0.2 * np.eye(d)


def _exact_field(m, S, gamma, ts):
    """Closed-form LS optimum at each time (module docstring): W = s (a^2 S' + s^2 I)^-1, bias = -a W m'."""
    mp, Sp = gmm.generated(m, S, gamma, "r1")
    a, s = np.exp(-ts), np.sqrt(-np.expm1(-2 * ts))
    Ws = np.array([si * np.linalg.inv(ai**2 * Sp + si**2 * np.eye(len(m))) for ai, si in zip(a, s)])
    return Ws, -a[:, None] * np.einsum("tij,j->ti", Ws, mp)


def _pushed_moments(Ws, bs, ts, d):
    # the ODE is affine in x, so pushing 0 and the unit vectors gives the generated N(0, I) -> N(mean, A A^T) exactly
    y = gmm.generate(Ws, bs, ts, np.vstack([np.zeros(d), np.eye(d)]))
    A = (y[1:] - y[0]).T
    return y[0], A @ A.T


def test_w2_general_formula_matches_sqrtm_and_identity_case():
    rng = np.random.default_rng(0)
    d = 4
    m1, m2, S1, S2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
    r = scipy.linalg.sqrtm(S2).real
    ref = ((m1 - m2) ** 2).sum() + np.trace(S1 + S2 - 2 * scipy.linalg.sqrtm(r @ S1 @ r).real)
    assert gmm.w2sq(m1, S1, m2, S2) == pytest.approx(ref, rel=1e-8)
    assert gmm.w2sq(m1, S1, m2, S2) == pytest.approx(gmm.w2sq(m2, S2, m1, S1), rel=1e-8)
    assert gmm.w2sq_to_standard(m1, m2, S2) == pytest.approx(gmm.w2sq(m1, np.eye(d), m2, S2), rel=1e-8)
    # d = 1: W2 is the distance of the quantile functions, |m1-m2|^2 + (s1-s2)^2
    assert gmm.w2sq(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[0.25]])) == pytest.approx(4 + 1.5**2)


def test_w2_is_the_cost_of_the_optimal_map_and_other_couplings_cost_more():
    rng = np.random.default_rng(1)
    d = 3
    m1, m2, S1, S2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
    r1, r1i = scipy.linalg.sqrtm(S1).real, np.linalg.inv(scipy.linalg.sqrtm(S1).real)
    T = r1i @ scipy.linalg.sqrtm(r1 @ S2 @ r1).real @ r1i  # the Brenier map N(m1,S1) -> N(m2,S2)
    np.testing.assert_allclose(T @ S1 @ T.T, S2, atol=1e-10)
    cost = lambda T: ((m1 - m2) ** 2).sum() + np.trace(S1 - 2 * T @ S1 + T @ S1 @ T.T)  # E|X - (m2 + T(X - m1))|^2
    w = gmm.w2sq(m1, S1, m2, S2)
    assert cost(T) == pytest.approx(w, rel=1e-8)
    r2 = scipy.linalg.sqrtm(S2).real
    for _ in range(50):  # every linear coupling S2^1/2 Q S1^-1/2 also pushes S1 to S2; none is cheaper
        Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        assert cost(r2 @ Q @ r1i) >= w - 1e-9


def test_entropy_formula_vs_monte_carlo_and_rank_one_lemma():
    rng = np.random.default_rng(2)
    d = 5
    m, S = rng.standard_normal(d), _spd(rng, d)
    x = rng.multivariate_normal(m, S, size=200_000)
    mc = -scipy.stats.multivariate_normal(m, S).logpdf(x).mean()
    assert gmm.entropy(S) == pytest.approx(mc, abs=0.02)
    gamma = 0.7
    kappa = gamma**2 / (1 + gamma**2)
    gain = gmm.entropy(gmm.generated(m, S, gamma, "r1")[1]) - gmm.entropy(S)
    assert gain == pytest.approx(0.5 * np.log1p(kappa * m @ np.linalg.solve(S, m)), rel=1e-10)
    gain_iso = gmm.entropy(gmm.generated(m, S, gamma, "iso")[1]) - gmm.entropy(S)
    lam = np.linalg.eigvalsh(S)
    assert gain_iso == pytest.approx(0.5 * np.log1p(kappa * (m @ m) / lam).sum(), rel=1e-10)


def test_mean_shrinkage_w2_term_vs_monte_carlo():
    # E|m/(1+g^2) - mu|^2 = rho^2 d/n + (1-rho)^2 |mu|^2 with rho = 1/(1+g^2): the source of the Omega(g^2 d/n) gain
    rng = np.random.default_rng(3)
    d, n, gamma = 8, 20, 0.3
    mu = gmm.class_means(rng, 1, d, 2.0)
    m, S = gmm.training_moments(rng, mu, [n], 40_000)
    rho = 1 / (1 + gamma**2)
    mp = gmm.generated(m, S, gamma, "r1")[0]
    mc = ((mp - mu) ** 2).sum(-1).mean()
    assert mc == pytest.approx(rho**2 * d / n + (1 - rho) ** 2 * 4.0, rel=0.02)
    assert ((m - mu) ** 2).sum(-1).mean() == pytest.approx(d / n, rel=0.02)
    assert np.mean(np.trace(S, axis1=-2, axis2=-1)) == pytest.approx(d * (n - 1) / n, rel=0.01)


def test_least_squares_fit_matches_closed_form_optimum():
    rng = np.random.default_rng(4)
    d, n = 3, 30
    x0 = gmm.class_means(rng, 1, d, 2.0)[0] + rng.standard_normal((n, d))
    m, S = gmm.moments(x0)
    ts = np.array([0.05, 0.5, 2.0])
    for gamma in (0.0, 1.0):
        Ws, bs = gmm.fit_denoiser(rng, x0, np.eye(4)[1], gamma, ts, 4000)
        We, be = _exact_field(m, S, gamma, ts)
        np.testing.assert_allclose(Ws, We, atol=0.03)
        np.testing.assert_allclose(bs, be, atol=0.03)
    # the isotropic form is not the optimum: its W differs by far more than the fitting noise
    Sp = gmm.generated(m, S, 1.0, "iso")[1]
    a, s = np.exp(-0.5), np.sqrt(-np.expm1(-1.0))
    assert np.abs(s * np.linalg.inv(a**2 * Sp + s**2 * np.eye(d)) - Ws[1]).max() > 0.1


def test_ode_with_exact_field_generates_the_closed_form():
    rng = np.random.default_rng(5)
    d = 3
    m, S = rng.standard_normal(d), _spd(rng, d)
    mr, Sr = gmm.generated(m, S, 0.6, "r1")
    errs = []
    for steps in (40, 160):  # Heun is second order: 4x the steps, ~16x less error
        ts = gmm.ode_times(steps)
        mg, Sg = _pushed_moments(*_exact_field(m, S, 0.6, ts), ts, d)
        errs.append(max(np.abs(mg - mr).max(), np.abs(Sg - Sr).max()))
    assert errs[1] < 1.5e-3 and errs[1] < errs[0] / 8


def test_simulated_generator_matches_exact_ls_form_not_isotropic():
    rng = np.random.default_rng(6)
    d, n = 3, 40
    x0 = gmm.class_means(rng, 1, d, 2.0)[0] + rng.standard_normal((n, d))
    m, S = gmm.moments(x0)
    ts = gmm.ode_times(60)
    for gamma in (0.0, 0.7):
        mg, Sg = _pushed_moments(*gmm.fit_denoiser(rng, x0, np.eye(2)[0], gamma, ts, 1500), ts, d)
        mr, Sr = gmm.generated(m, S, gamma, "r1")
        np.testing.assert_allclose(mg, mr, atol=0.05)
        np.testing.assert_allclose(Sg, Sr, atol=0.05)
        if gamma:
            assert np.abs(Sg - gmm.generated(m, S, gamma, "iso")[1]).max() > 0.5
            samples = gmm.generate(*gmm.fit_denoiser(rng, x0, np.eye(2)[0], gamma, ts, 300), ts,
                                   rng.standard_normal((20_000, d)))
            assert gmm.w2sq(*gmm.moments(samples), mr, Sr) < 0.02


def test_slight_corruption_helps_w2_severe_hurts_entropy_always_grows():
    rng = np.random.default_rng(7)
    d, sizes = 8, [20, 80]
    mus = gmm.class_means(rng, 2, d, np.sqrt(d))
    m, S = gmm.training_moments(rng, mus, sizes, 2000)
    for form in gmm.FORMS:
        dH_small, dW_small = gmm.gains(mus, m, S, 0.3 / np.sqrt(np.array(sizes)), form)
        dH_big, dW_big = gmm.gains(mus, m, S, 2.0, form)
        assert (dW_small > 0).all() and (dW_big < 0).all()
        assert (dH_small > 0).all() and (dH_big > dH_small).all()


def test_configure_overrides_and_rejects_unknown_keys(monkeypatch):
    monkeypatch.setattr(gmm, "draws", gmm.draws)
    monkeypatch.setattr(gmm, "class_sizes", gmm.class_sizes)
    gmm.configure(["--draws=7", "--class_sizes=(30, 40)"])
    assert gmm.draws == 7 and gmm.class_sizes == (30, 40)
    with pytest.raises(SystemExit, match="nonsense"):
        gmm.configure(["--nonsense=1"])
    with pytest.raises(SystemExit, match="draws"):
        gmm.configure(["--draws=many"])
