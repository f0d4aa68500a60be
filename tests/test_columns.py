"""Per-step schedule columns as knots (unlearn_fast/columns.py): exact where the schedule is made of runs, steps, lines
or repeats, within a measured error for smooth ones, bounded bytes whatever the number of steps, and hostile knots
refused. References: the torch schedulers' own learning rates and closed-form schedules computed here."""
import math

import pytest
import torch

from unlearn_fast import columns


def scheduled(make, steps, **sgd):
    """The learning rates (and momenta) torch's scheduler `make(optimizer)` gives over `steps` steps, as a recorder
    reads them (before each step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, **sgd)
    sched, lrs, momenta = make(opt), [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        momenta.append(opt.param_groups[0].get("momentum", 0.0))
        opt.step()
        sched.step()
    return torch.tensor(lrs, dtype=torch.float64)[:, None], torch.tensor(momenta, dtype=torch.float64)[:, None]


def round_trip(column, max_knots=None, tolerance=columns.EXACT):
    code, err = columns.encode(column, max_knots, tolerance)
    return code, err, columns.decode(code, column.dtype, "test")


S = torch.optim.lr_scheduler


@pytest.mark.parametrize("steps", [1, 2, 3, 997, 20011])
def test_schedules_made_of_runs_steps_and_repeats_are_exact_in_a_few_knots(steps):
    cases = {  # name: (column, knots at most)
        "constant": (scheduled(lambda o: S.LambdaLR(o, lambda s: 1.0), steps)[0], 1),
        "steps": (scheduled(lambda o: S.StepLR(o, 2000, 0.5), steps)[0], 2 * (steps // 2000) + 2),
        "warm restarts": (scheduled(lambda o: S.CosineAnnealingWarmRestarts(o, T_0=37), steps)[0], 37),
        # a loader without drop_last: 22 full batches and a short one every epoch
        "batch sizes": (torch.tensor(([64] * 22 + [29]) * (steps // 23 + 1), dtype=torch.int64)[:steps], 3),
        "two groups": (torch.cat([scheduled(lambda o: S.StepLR(o, 3000, 0.1), steps)[0]] * 2, 1) * torch.tensor([1.0, 0.25], dtype=torch.float64),
                       2 * (steps // 3000) + 2),
    }
    for name, (column, most) in cases.items():
        code, err, back = round_trip(column, max_knots=64)
        assert torch.equal(back, column), name
        assert err == 0.0 and code["knot_steps"].numel() <= most, (name, code["knot_steps"].numel())


def test_a_linear_warm_up_and_decay_is_exact_to_rounding_in_four_knots():
    steps, warm = 20000, 500
    lin = scheduled(lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.01, 1.0, warm), S.LinearLR(o, 1.0, 0.0, steps - warm)], [warm]), steps)[0]
    code, err, back = round_trip(lin, max_knots=64)
    assert code["knot_steps"].numel() <= 4 and err == 0.0
    assert float((back - lin).abs().max()) <= 1e-12 * float(lin.abs().max())


@pytest.mark.parametrize("steps", [1000, 100000])
def test_a_smooth_schedule_takes_the_same_bytes_whatever_the_number_of_steps(steps):
    """A cosine to 0 over any number of steps in 200 knots: the same bytes, the error decode() really leaves is the one
    encode() reports, and it is near the chord bound of evenly spaced knots, (pi / 199)^2 / 16 of the peak."""
    t = torch.arange(steps, dtype=torch.float64)
    cosine = (0.1 * (1 + torch.cos(math.pi * t / steps)) / 2)[:, None]
    code, err, back = round_trip(cosine, max_knots=200)
    assert code["knot_steps"].numel() == 200 and columns.nbytes(code) == 200 * 12 + 16
    measured = float((back - cosine).abs().max()) / 0.1
    assert measured == pytest.approx(err, rel=1e-6)
    assert 0 < measured <= 2 * (math.pi / 199) ** 2 / 16  # (greedy splitting, not even spacing: measured 2.3e-5 / 1.6e-5)
    code, err, back = round_trip(cosine)  # exactness asked for: every step a knot (found in one pass, not by splitting)
    assert err == 0.0 and torch.equal(back, cosine) and code["knot_steps"].numel() >= steps - 2  # (the inflection's steps lie on a line)
    # a column without structure: every step when they all fit the cap, else at most MAX_SPLITS knots, the error reported
    noise = torch.rand(steps, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    code, err, back = round_trip(noise, max_knots=steps, tolerance=1e-4)
    assert err == 0.0 and torch.equal(back, noise) and code["knot_steps"].numel() == steps
    code, err = columns.encode(noise, max_knots=steps - 1, tolerance=1e-4)
    back = columns.decode(code, noise.dtype, "test")
    assert code["knot_steps"].numel() <= min(steps - 1, columns.MAX_SPLITS)
    assert err == pytest.approx(float((back - noise).abs().max()) / float(noise.max())) and err > 1e-4


def test_a_one_cycle_policys_rates_and_momenta_are_approximated_within_the_reported_error():
    lrs, momenta = scheduled(lambda o: S.OneCycleLR(o, 0.1, total_steps=5000), 5000, momentum=0.9)
    for column in (lrs, momenta):
        _, err, back = round_trip(column, max_knots=100)
        assert 0 < err < 1e-3
        assert float((back - column).abs().max()) / float(column.abs().max()) == pytest.approx(err, rel=1e-6)


def test_the_tolerance_is_met_whenever_every_step_fits_the_cap():
    # a wiggle too fast for MAX_SPLITS knots to follow within 1e-4: every step is kept instead of stopping short
    steps = 100000
    col = (1 + 5e-3 * torch.sin(2 * math.pi * torch.arange(steps, dtype=torch.float64) / 50))[:, None]
    for cap in (None, steps):
        code, err, back = round_trip(col, max_knots=cap, tolerance=1e-4)
        assert err == 0.0 and torch.equal(back, col)
    code, err = columns.encode(col, steps - 1, 1e-4)  # (one knot short of every step: the best MAX_SPLITS give, reported)
    assert code["knot_steps"].numel() == columns.MAX_SPLITS and err > 1e-4


def test_integer_columns_decode_to_integers_and_report_their_error_in_units():
    sizes = torch.randint(50, 70, (5000,), generator=torch.Generator().manual_seed(0))
    code, err, back = round_trip(sizes, max_knots=50)
    assert back.dtype == torch.int64 and err == float((back - sizes).abs().max()) and err >= 1
    _, err, back = round_trip(sizes)  # no cap: exact
    assert err == 0.0 and torch.equal(back, sizes)


def test_empty_and_one_step_columns():
    for column in (torch.zeros(0, 2, dtype=torch.float64), torch.full((1, 2), 0.3, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)):
        code, err, back = round_trip(column, max_knots=4)
        assert torch.equal(back, column) and back.shape == column.shape and err == 0.0


def _code():
    return columns.encode(torch.tensor([[0.1], [0.1], [0.05], [0.05]], dtype=torch.float64))[0]


@pytest.mark.parametrize("mangle", [
    lambda c: c.update(span=c["span"].to(torch.int32)),
    lambda c: c.update(span=torch.tensor([4, 5])),  # a period longer than the column
    lambda c: c.update(span=torch.tensor([2**40, 2])),  # a column too long to decode
    lambda c: c.update(knot_steps=c["knot_steps"].flip(0)),
    lambda c: c.update(knot_steps=c["knot_steps"][1:], knot_values=c["knot_values"][1:]),  # not starting at 0
    lambda c: c.update(knot_values=c["knot_values"][:1]),
    lambda c: c.update(knot_values=torch.full_like(c["knot_values"], float("nan"))),
    lambda c: c.update(knot_values=c["knot_values"].to(torch.int32)),  # integers for a float column
    lambda c: c.pop("span"),
    lambda c: c.update(span=torch.tensor([2**20, 1]), knot_steps=torch.tensor([0], dtype=torch.int32),
                       knot_values=torch.zeros(1, 2**14, dtype=torch.float64)),  # 2^34 values to allocate
    lambda c: c.update(span=torch.tensor([3, 3]), knot_steps=torch.tensor([0, 2], dtype=torch.int32),
                       knot_values=torch.tensor([[-1.7e308], [1.7e308]], dtype=torch.float64)),  # finite knots, inf between
])
def test_hostile_knots_are_a_value_error_naming_where(mangle):
    code = _code()
    assert torch.equal(columns.decode(code, torch.float64, "h"), torch.tensor([[0.1], [0.1], [0.05], [0.05]], dtype=torch.float64))
    mangle(code)
    with pytest.raises(ValueError, match="history: h"):
        columns.decode(code, torch.float64, "h")
