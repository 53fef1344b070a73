"""The paper's Gaussian-mixture theory (PAPER.md section 6), in closed form and simulated.

Class k: data N(mu_k, I) in d dimensions, n_k training points, a per-class linear denoiser
eps_hat = W_t x_t + V_t (c + gamma*xi) with c the one-hot class embedding (|c| = 1) and xi ~ N(0, I) (CEP-G).
With m, S the class's empirical mean and (1/n) covariance and kappa = gamma^2/(1+gamma^2), training generates
  clean (gamma = 0):  N(m, S)
  paper's form:       N(m/(1+gamma^2), S + kappa*|m|^2 I)     ("iso")
  exact LS form:      N(m/(1+gamma^2), S + kappa*m m^T)        ("r1")
Derivation of the LS optimum at one time (x_t = a x0 + s eps, a = e^-t, s^2 = 1 - a^2, z = c + gamma*xi):
  normal eq. of V:  0 = E[eps z^T] = W E[x_t z^T] + V E[z z^T] = W a m c^T + V (c c^T + gamma^2 I);
                    times (c c^T + gamma^2 I)^-1 c = c/(1+gamma^2):  V c = -a W m/(1+gamma^2)
  normal eq. of W:  s I = E[eps x_t^T] = W (a^2 (S + m m^T) + s^2 I) + (V c) a m^T = W (a^2 (S + kappa m m^T) + s^2 I)
so at sampling (z = c) eps_hat = s (a^2 S' + s^2 I)^-1 (x - a m'), m' = m/(1+gamma^2), S' = S + kappa m m^T:
exactly the eps of data N(m', S'), which the probability-flow ODE therefore generates. The paper's isotropic
kappa*|m|^2 I does not follow from its own objective: it agrees with the rank-one term along m only and adds
the same variance in the d-1 other directions. (|c| = r would give 1/(1+gamma^2/r^2) in place of 1/(1+gamma^2).)
The simulation below fits W, V by least squares on noised data and integrates the ODE; it lands on "r1".

Run: python gmm.py [--key=value ...]   (writes out/gmm/ and assets/gmm.png)
"""
import ast
import os
import sys

import numpy as np

# config, overridable as --key=value
dim = 16
class_sizes = (24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # one class per size: the n_k sweep
mu_norm = 4.0  # |mu_k| = sqrt(dim): the size of a mean drawn from N(0, I); the theorems' rates depend on it
draws = 200  # training sets drawn per class, gains are averaged over them
table_n = 64  # class size shown in the gamma table
n_sweep_c = 0.5  # the n_k sweep uses gamma = n_sweep_c / sqrt(n_k), the theorem's gamma = O(1/sqrt(n_k))
sim_n = 64  # simulation: class size, corrupted gamma, noised copies per point, ODE steps, generated samples
sim_gamma = 0.5
sim_reps = 300
sim_steps = 120
sim_gen = 20000
seed = 0
out_dir = "out/gmm"
CONFIG = [k for k in list(globals()) if not k.startswith("_") and k not in ("ast", "os", "sys", "np")]
GAMMAS = np.geomspace(1e-2, 1e1, 31)
FORMS = ("iso", "r1")


def class_means(rng, k, d, norm):
    u = rng.standard_normal((k, d))
    return norm * u / np.linalg.norm(u, axis=1, keepdims=True)


def moments(x):
    """Empirical mean and (1/n) covariance over axis -2: the moments the least-squares objective sees."""
    m = x.mean(-2)
    xc = x - m[..., None, :]
    return m, np.einsum("...ni,...nj->...ij", xc, xc) / x.shape[-2]


def generated(m, S, gamma, form):
    """Mean and covariance generated after training with CEP strength gamma (a scalar, or one per class on the
    axis before the last of m), in the paper's form or the exact one."""
    g2 = np.asarray(gamma, float) ** 2
    kappa = (g2 / (1 + g2))[..., None, None]
    mm = np.einsum("...i,...j->...ij", m, m)
    extra = np.einsum("...ii->...", mm)[..., None, None] * np.eye(m.shape[-1]) if form == "iso" else mm
    return m / (1 + g2[..., None]), S + kappa * extra


def entropy(S):
    return 0.5 * (np.linalg.slogdet(S)[1] + S.shape[-1] * np.log(2 * np.pi * np.e))


def w2sq_to_standard(mu, m, S):
    """W2^2(N(mu, I), N(m, S)) = |m-mu|^2 + sum_i (sqrt(l_i) - 1)^2, l_i the eigenvalues of S."""
    lam = np.clip(np.linalg.eigvalsh(S), 0, None)
    return ((m - mu) ** 2).sum(-1) + ((np.sqrt(lam) - 1) ** 2).sum(-1)


def _sqrt_psd(A):
    lam, U = np.linalg.eigh(A)
    return (U * np.sqrt(np.clip(lam, 0, None))) @ U.T


def w2sq(m1, S1, m2, S2):
    """General W2^2 between Gaussians: |m1-m2|^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2)."""
    r = _sqrt_psd(S2)
    return ((m1 - m2) ** 2).sum() + np.trace(S1 + S2 - 2 * _sqrt_psd(r @ S1 @ r))


def training_moments(rng, mus, sizes, n_draws):
    """m (draws, K, d) and S (draws, K, d, d) of n_draws fresh training sets per class."""
    ms, Ss = zip(*(moments(mu + rng.standard_normal((n_draws, n, len(mu)))) for mu, n in zip(mus, sizes)))
    return np.stack(ms, 1), np.stack(Ss, 1)


def gains(mus, m, S, gamma, form):
    """Per-class mean over draws of (entropy gain, W2^2 gain = clean minus corrupted; > 0 means closer to truth)."""
    m2, S2 = generated(m, S, gamma, form)
    dH = entropy(S2) - entropy(S)
    dW = w2sq_to_standard(mus, m, S) - w2sq_to_standard(mus, m2, S2)
    return dH.mean(0), dW.mean(0)


def crossover(gammas, g):
    """First gamma where the mean gain turns from positive to negative (log-interpolated): slight -> severe."""
    i = np.flatnonzero((g[:-1] > 0) & (g[1:] <= 0))
    if not len(i):
        return np.nan
    i = i[0]
    lg = np.log(gammas[i]) + g[i] / (g[i] - g[i + 1]) * np.log(gammas[i + 1] / gammas[i])
    return float(np.exp(lg))


def fit_denoiser(rng, x0, c, gamma, ts, reps):
    """Least squares eps ~ W x_t + V (c + gamma*xi) on reps noised copies of the training set, at each time;
    returns W_t and the bias V_t c used at sampling (clean embedding, as CEP samples)."""
    d = x0.shape[1]
    x = np.repeat(x0, reps, 0)
    Ws, bs = [], []
    for t in ts:
        a, s = np.exp(-t), np.sqrt(-np.expm1(-2 * t))
        eps = rng.standard_normal(x.shape)
        z = c + gamma * rng.standard_normal((len(x), len(c)))
        X = np.hstack([a * x + s * eps, z])
        # normal equations, min-norm solve: at gamma = 0 the unused one-hot columns of z are all zero
        coef = np.linalg.lstsq(X.T @ X, X.T @ eps, rcond=None)[0]
        Ws.append(coef[:d].T)
        bs.append(coef[d:].T @ c)
    return np.array(Ws), np.array(bs)


def ode_times(steps, t_max=10.0, t_min=1e-4):
    # geometric in t: the OU marginal changes on a log-time scale near 0, and is N(0, I) to within e^-10 by t = 10
    return np.geomspace(t_max, t_min, steps + 1)


def generate(Ws, bs, ts, x):
    """Heun integration of the OU probability-flow ODE dx/dt = -x + eps_hat(x, t)/s_t from ts[0] down to ts[-1]."""
    def f(i, x):
        return -x + (x @ Ws[i].T + bs[i]) / np.sqrt(-np.expm1(-2 * ts[i]))
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        k1 = f(i, x)
        x = x + h / 2 * (k1 + f(i + 1, x + h * k1))
    return x


def plot(path, sizes, dW, dH, ratios):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for j, n in enumerate(sizes[::3]):
        k = sizes.index(n)
        for form, ls in zip(FORMS, ("-", "--")):
            y = dW[form][:, k] / (dim / n)
            ax[0].plot(GAMMAS, y, ls, color=f"C{j}", label=f"{form} n={n}")
            g0 = crossover(GAMMAS, dW[form][:, k])
            ax[0].axvline(g0, color=f"C{j}", ls=ls, lw=0.6)
    ax[0].plot(GAMMAS, GAMMAS**2, "k:", label="claimed rate gamma^2")
    ax[0].set(xscale="log", xlabel="gamma", title="W2^2 gain / (d/n)  (vertical: slight->severe)", ylim=(-10, 10))
    ax[0].set_yscale("symlog", linthresh=1e-2)
    k = sizes.index(table_n)
    for form, ls in zip(FORMS, ("-", "--")):
        ax[1].plot(GAMMAS, dH[form][:, k] / dim, ls, label=f"{form} n={table_n}")
    ax[1].plot(GAMMAS, GAMMAS**2, "k:", label="claimed rate gamma^2")
    ax[1].set(xscale="log", yscale="log", xlabel="gamma", title="entropy gain / d")
    for form, ls in zip(FORMS, ("-o", "--s")):
        ax[2].plot(sizes, ratios[form], ls, label=form)
    ax[2].set(xscale="log", yscale="log", xlabel="n_k", title=f"W2^2 gain / (g^2 d/n), g={n_sweep_c}/sqrt(n)")
    ax[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for a in ax:
        a.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def main():
    rng = np.random.default_rng(seed)
    sizes = list(class_sizes)
    assert min(sizes) > dim + 1 and table_n in sizes and sim_n > dim, "need n_k > d + 1 (finite entropy)"
    lines = []

    def say(s=""):
        print(s)
        lines.append(s)

    mus = class_means(rng, len(sizes), dim, mu_norm)
    m, S = training_moments(rng, mus, sizes, draws)
    dH, dW = {}, {}
    for form in FORMS:
        dH[form], dW[form] = map(np.array, zip(*(gains(mus, m, S, g, form) for g in GAMMAS)))
    k = sizes.index(table_n)
    say(f"d={dim} |mu|={mu_norm} n_k={table_n} draws={draws}; gains of corrupted over clean training, mean over draws")
    say(f"{'gamma':>7} {'dH iso':>9} {'dH r1':>9} {'g^2 d':>9} {'dW2 iso':>9} {'dW2 r1':>9} {'g^2 d/n':>9}")
    for i in range(0, len(GAMMAS), 3):
        g = GAMMAS[i]
        say(f"{g:7.3f} {dH['iso'][i, k]:9.3g} {dH['r1'][i, k]:9.3g} {g * g * dim:9.3g} "
            f"{dW['iso'][i, k]:9.3g} {dW['r1'][i, k]:9.3g} {g * g * dim / table_n:9.3g}")
    say("\nslight -> severe: gamma where the W2^2 gain crosses 0; rate ratio dW2/(g^2 d/n) at g = c/sqrt(n)")
    say(f"{'n_k':>5} {'1/sqrt(n)':>9} {'g* iso':>8} {'g* r1':>8} {'ratio iso':>9} {'ratio r1':>9}")
    n = np.array(sizes)
    gs = n_sweep_c / np.sqrt(n)
    ratios = {form: gains(mus, m, S, gs, form)[1] / (gs**2 * dim / n) for form in FORMS}
    for k, n in enumerate(sizes):
        say(f"{n:5d} {1 / np.sqrt(n):9.3f} {crossover(GAMMAS, dW['iso'][:, k]):8.3f} "
            f"{crossover(GAMMAS, dW['r1'][:, k]):8.3f} {ratios['iso'][k]:9.3g} {ratios['r1'][k]:9.3g}")
    say("\nentropy rate dH/(g^2 d) at g=0.05, n=4d, against d, for two sizes of the class means")
    say(f"{'d':>4} {'iso |mu|=1':>11} {'r1 |mu|=1':>11} {'iso |mu|=vd':>12} {'r1 |mu|=vd':>12}")
    for d in (4, 8, 16, 32, 64):
        row = []
        for norm in (1.0, np.sqrt(d)):
            mu1 = class_means(rng, 1, d, norm)
            m1, S1 = training_moments(rng, mu1, [4 * d], 50)
            row += [gains(mu1, m1, S1, 0.05, form)[0][0] / (0.05**2 * d) for form in FORMS]
        say(f"{d:4d} {row[0]:11.3g} {row[1]:11.3g} {row[2]:12.3g} {row[3]:12.3g}")
    say(f"\nsimulation: LS denoiser on noised data + probability-flow ODE, d={dim} n={sim_n}, {sim_gen} samples")
    say(f"{'gamma':>6} {'|mean-m`|':>10} {'|cov-r1|F':>10} {'|cov-iso|F':>10} {'W2^2 gen':>9} {'r1':>9} {'iso':>9}")
    mu = class_means(rng, 1, dim, mu_norm)[0]
    x0 = mu + rng.standard_normal((sim_n, dim))
    m0, S0 = moments(x0)
    ts = ode_times(sim_steps)
    for g in (0.0, sim_gamma):
        Ws, bs = fit_denoiser(rng, x0, np.eye(len(sizes))[0], g, ts, sim_reps)
        mg, Sg = moments(generate(Ws, bs, ts, rng.standard_normal((sim_gen, dim))))
        (mr, Sr), (mi, Si) = generated(m0, S0, g, "r1"), generated(m0, S0, g, "iso")
        w = [w2sq_to_standard(mu, *p) for p in ((mg, Sg), (mr, Sr), (mi, Si))]
        say(f"{g:6.2f} {np.linalg.norm(mg - mr):10.3g} {np.linalg.norm(Sg - Sr):10.3g} "
            f"{np.linalg.norm(Sg - Si):10.3g} {w[0]:9.3g} {w[1]:9.3g} {w[2]:9.3g}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    np.savez(os.path.join(out_dir, "gains.npz"), gammas=GAMMAS, sizes=sizes,
             **{f"{q}_{form}": v[form] for q, v in (("dH", dH), ("dW2", dW), ("ratio", ratios)) for form in FORMS})
    os.makedirs("assets", exist_ok=True)
    plot("assets/gmm.png", sizes, dW, dH, ratios)


def configure(argv):
    for arg in argv:
        key, _, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in CONFIG:
            raise SystemExit(f"unknown config key: {key!r} (known: {', '.join(CONFIG)})")
        old = globals()[key]
        new = None
        try:
            new = ast.literal_eval(val) if isinstance(old, tuple) else type(old)(val)
        except (ValueError, SyntaxError):
            pass
        if type(new) is not type(old):
            raise SystemExit(f"bad value for {key!r}: {val!r} (expected {type(old).__name__})")
        globals()[key] = new


if __name__ == "__main__":
    configure(sys.argv[1:])
    main()
