"""``sweep`` returns (state, info) as BlackJAX kernels do: the ω step's acceptance,
averaged by ``run`` and exported as ``liftstream_sampler_acceptance{block}``."""

import numpy as np

from kernels.data import make_data
from kernels.gibbs import init, sweep
from kernels.rng import Rng
from kernels.sampler import run
from streams.service.metrics import Metrics


def _data():
    g = np.random.default_rng(3)
    n = g.integers(5, 60, (2, 3, 4)).astype(float)
    sy = n * g.normal(1.0, 0.3, n.shape)
    return make_data(n, sy, sy**2 / n + n, np.full((2, 4), 20.0), np.full((2, 4), 15.0), 3,
                     np.array([1.0, 4.0, 10.0, 25.0]),
                     kmask=np.array([[True, True, True], [True, True, False]]))


def test_sweep_info_is_the_omega_steps_acceptance():
    data = _data()
    rng = Rng(1)
    state = init(data, rng, 4)
    new, info = sweep(state, data, rng)
    assert info.omega.shape == state.omega2.shape == (2, 4, 2)
    np.testing.assert_array_equal(info.omega == 1.0, new.omega2 != state.omega2)
    _, _, mean = run(new, data, rng, 40)
    rate = mean.acceptance(data)["omega"]
    assert rate.shape == (2,)
    # a 16-point grid proposal: acceptance ≈ 0.9 (kernels.grids), never 0 or 1 over 40 sweeps
    assert np.all((rate > 0.5) & (rate < 1.0)), rate


def test_metrics_export_acceptance_by_block():
    m = Metrics()
    m.set_acceptance({"omega": 0.9, "platform": 0.75})
    text = m.render()
    assert "# TYPE liftstream_sampler_acceptance gauge" in text
    assert 'liftstream_sampler_acceptance{block="omega"} 0.9' in text
    assert 'liftstream_sampler_acceptance{block="platform"} 0.75' in text
