"""The Chinchilla approach-3 fit (`jaxsys.tools.scaling`) on synthetic L(N, D): pure numpy/scipy."""

import numpy as np
import pytest

from jaxsys.config import apply_overrides

from jaxsys.config import presets
from jaxsys.model.params import count_params
from jaxsys.model.transformer import abstract_params
from jaxsys.tools.scaling import ScalingFit, fit_scaling_law, non_embedding_params

# A 4 × 4 grid over the sweep's range; the true law differs from the fit's starting grid and
# from Chinchilla's numbers, so recovering it means the optimiser found it.
N_16, D_16 = (x.ravel() for x in np.meshgrid([2.5e4, 1e5, 3.3e5, 6e5], [5e4, 1e5, 2e5, 4e5]))
TRUE = ScalingFit(E=1.3, A=40.0, B=300.0, alpha=0.4, beta=0.45, objective=0.0, starts=0)


def test_fit_recovers_known_exponents_from_exact_data():
    fit = fit_scaling_law(N_16, D_16, TRUE.predict(N_16, D_16), keep=8)  # 8 starts keep it fast
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=1e-4), name
    assert fit.a == pytest.approx(0.45 / 0.85, rel=1e-4) and fit.b == pytest.approx(0.4 / 0.85, rel=1e-4)


def test_fit_with_noise_stays_near_the_truth_and_beats_it_on_the_objective():
    rng = np.random.default_rng(0)
    L = TRUE.predict(N_16, D_16) * np.exp(rng.normal(0.0, 0.003, N_16.size))  # 0.3 % noise
    fit = fit_scaling_law(N_16, D_16, L, keep=8)
    assert abs(fit.alpha - TRUE.alpha) < 0.1 and abs(fit.beta - TRUE.beta) < 0.1
    # The optimum is at least as good as the truth on its own objective (Huber δ=1e-3, log space).
    r = np.log(TRUE.predict(N_16, D_16)) - np.log(L)
    huber = np.where(np.abs(r) <= 1e-3, r ** 2 / 2, 1e-3 * (np.abs(r) - 5e-4)).sum()
    assert fit.objective <= huber + 1e-15


def test_compute_optimal_frontier_spends_c_and_minimises_loss_on_it():
    C = 1e15
    n_opt, d_opt = TRUE.compute_optimal(C)
    assert 6 * n_opt * d_opt == pytest.approx(C, rel=1e-9)
    n_grid = n_opt * np.logspace(-1, 1, 201)  # along the iso-FLOP line through the optimum
    assert np.argmin(TRUE.predict(n_grid, C / (6 * n_grid))) == 100


def test_non_embedding_params_drops_token_and_position_tables():
    cfg = apply_overrides(presets.shakespeare(), ["model.family=gpt2"])  # tied head, learned positions
    shapes, _ = abstract_params(cfg.model)
    m = cfg.model
    assert non_embedding_params(m) == count_params(shapes) - m.vocab_size * m.embed_dim - m.seq_len * m.embed_dim


@pytest.mark.slow  # six real training runs: minutes, mostly compile
def test_quick_sweep_trains_fits_and_plots(tmp_path):
    from experiments import scaling_laws

    grid = {"sizes": [(1, 16, 2), (2, 32, 2), (2, 48, 3)], "steps": [4, 8]}
    rows = scaling_laws.sweep(grid)
    assert [r["D"] for r in rows] == [4 * 1024, 8 * 1024] * 3
    assert all(np.isfinite(r["val_loss"]) for r in rows)
    fit = scaling_laws.report(rows)
    scaling_laws.plot(rows, fit, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
