"""Scaling laws: fit L(N, D) = E + A / N^α + B / D^β to a sweep, the way Chinchilla's third
approach does, and the compute-optimal frontier it implies.

N is the number of *non-embedding* parameters (`non_embedding_params`: everything but the
token embedding, the position table and an untied output head; Kaplan et al. 2020 count the
same; Chinchilla counts all parameters, which at a 256-byte vocabulary and D ≥ 32 differs by
a few 10 %), D the number of training tokens, L the validation loss in nats per token.

The fit (Hoffmann et al. 2022, appendix D.2): minimise Σ_i Huber_δ(LSE(a − α·log N_i,
b − β·log D_i, e) − log L_i) over (a, b, e, α, β) with δ = 1e-3, by L-BFGS from every point of
a grid of initialisations, keeping the best; then A = exp(a), B = exp(b), E = exp(e). The
residual is in log space, so each run weighs the same whatever its loss. Gradients are exact
(the log-sum-exp's softmax weights), so scipy's L-BFGS-B does not difference numerically.
The tolerances are tight (ftol 1e-14, gtol 1e-10): with δ = 1e-3 the gradients are tiny, and
scipy's defaults stop far from the optimum (Besiroglu et al. 2024 traced part of the gap
between their refit and the paper's to such early stopping).

With C ≈ 6·N·D FLOPs, minimising L under that constraint gives N_opt(C) = G·(C/6)^a and
D_opt(C) = (C/6)^b / G with a = β/(α+β), b = α/(α+β), G = (α·A / (β·B))^(1/(α+β)).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy
from scipy.optimize import minimize
from scipy.special import huber

from jaxsys.config import ModelConfig
from jaxsys.model.flops import param_counts

# Chinchilla's grid of initialisations (appendix D.2): 5 × 5 × 5 × 6 × 6 = 4500 starts.
CHINCHILLA_GRID = {"alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
                   "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                   "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)}
HUBER_DELTA = 1e-3
# The paper's approach-3 fit (Hoffmann et al. 2022, eq. 10), for comparison.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    """L(N, D) = E + A / N^alpha + B / D^beta (nats per token; N parameters, D tokens)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # the Huber sum at the optimum
    starts: int  # how many initialisations were tried

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    def predict(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        """Predicted loss (nats per token) at N parameters and D tokens, broadcast."""
        N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def compute_optimal(self, C: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising the predicted loss at C = 6·N·D FLOPs."""
        C = np.asarray(C, np.float64)
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return G * (C / 6.0) ** self.a, (C / 6.0) ** self.b / G


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters of `cfg`'s model without the token embedding, the position table (gpt2) and
    the output head when untied: the N of the fit."""
    m = cfg.resolved()
    embedding = m.vocab_size * m.embed_dim * (1 if m.tied_head else 2)
    if m.family == "gpt2":
        embedding += m.seq_len * m.embed_dim
    return param_counts(m).total - embedding


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run scipy's OpenBLAS on one thread meanwhile. L-BFGS-B's 5 × 5 linear algebra is far
    too small for threads, and on a busy machine their spinning made each L-BFGS-B iteration
    cost ~14 ms instead of ~1.5 ms (measured 2026-12-02, 2 cores at load ~12). Equivalent to
    OPENBLAS_NUM_THREADS=1, which only works before scipy is imported; a no-op where scipy's
    wheel does not ship its own OpenBLAS."""
    libs = sorted((Path(scipy.__file__).parent.parent / "scipy.libs").glob("libscipy_openblas*.so*"))
    try:
        blas = ctypes.CDLL(str(libs[0]))
        get, set_ = blas.scipy_openblas_get_num_threads, blas.scipy_openblas_set_num_threads
    except (IndexError, OSError, AttributeError):
        yield
        return
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Huber sum of log-space residuals at theta = (a, b, e, alpha, beta), and its gradient."""
    a, b, e, alpha, beta = theta
    terms_R3 = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)], axis=1)
    # Log-sum-exp and its softmax by hand: scipy.special's versions cost ~0.7 ms a call here
    # (array-API dispatch), 30x the rest of the objective, which L-BFGS calls ~10^5 times.
    top_R = terms_R3.max(axis=1)
    exp_R3 = np.exp(terms_R3 - top_R[:, None])
    total_R = exp_R3.sum(axis=1)
    r = top_R + np.log(total_R) - logL
    w_R3 = exp_R3 / total_R[:, None]  # d LSE / d term
    dr = np.clip(r, -delta, delta)  # Huber'(r)
    grad = np.array([dr @ w_R3[:, 0], dr @ w_R3[:, 1], dr @ w_R3[:, 2],
                     -(dr * w_R3[:, 0]) @ logN, -(dr * w_R3[:, 1]) @ logD])
    return float(huber(delta, r).sum()), grad


def _initial_objectives(theta_S5: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                        delta: float) -> np.ndarray:
    """The Huber objective at each of S starting points at once (no gradient)."""
    a, b, e, alpha, beta = (theta_S5[:, i, None] for i in range(5))
    terms_S3R = np.stack(np.broadcast_arrays(a - alpha * logN, b - beta * logD, e), axis=1)
    top_SR = terms_S3R.max(axis=1)
    r_SR = top_SR + np.log(np.exp(terms_S3R - top_SR[:, None]).sum(axis=1)) - logL
    return huber(delta, r_SR).sum(axis=1)


def fit_scaling_law(N: Sequence[float], D: Sequence[float], L: Sequence[float],
                    grid: dict[str, Sequence[float]] | None = None, keep: int | None = 32,
                    delta: float = HUBER_DELTA) -> ScalingFit:
    """Fit L(N, D) to runs of N parameters trained on D tokens reaching loss L (nats), by
    L-BFGS from points of `grid` (default `CHINCHILLA_GRID`); the best fit found.

    `keep`: run L-BFGS only from the `keep` grid points of lowest initial objective (all of
    them with None, as the paper does). One L-BFGS run costs ~100-500 iterations, so the
    paper's 4500 starts take minutes in scipy on a loaded 2-core machine; a prescreen is a
    heuristic (docs/benchmarks.md, "Scaling laws", says what it was checked against)."""
    logN, logD, logL = (np.log(np.asarray(x, np.float64)) for x in (N, D, L))
    if not (logN.shape == logD.shape == logL.shape) or logN.size < 5:
        raise ValueError(f"need ≥ 5 runs with one N, D and L each; got {logN.size}, {logD.size}, {logL.size}")
    g = grid or CHINCHILLA_GRID
    starts_S5 = np.array([[a, b, e, alpha, beta] for alpha, beta, e, a, b
                          in itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])])
    if keep is not None and keep < len(starts_S5):
        starts_S5 = starts_S5[np.argsort(_initial_objectives(starts_S5, logN, logD, logL, delta), kind="stable")[:keep]]
    best = None
    with _one_blas_thread():
        for x0 in starts_S5:
            res = minimize(_objective, x0, args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B",
                           options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10})
            if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
    a, b, e, alpha, beta = best.x
    return ScalingFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                      beta=float(beta), objective=float(best.fun), starts=len(starts_S5))
