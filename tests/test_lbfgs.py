"""stylekit's L-BFGS: torch's iteration, with directions computed without reading the device back."""

import math
import warnings

import pytest
import torch

from stylekit import lbfgs

N = 30


def _problem():
    """A smooth, non-quadratic function of 30 variables with a unique minimum (float64)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(N, N, generator=gen, dtype=torch.float64)
    a = a @ a.T / N + 0.1 * torch.eye(N, dtype=torch.float64)
    b = torch.randn(N, generator=gen, dtype=torch.float64)
    return lambda x: 0.5 * x @ a @ x - b @ x + 0.1 * x.pow(4).sum()


def _closure(f, x, counter):
    def closure():
        x.grad = None
        loss = f(x)
        loss.backward()
        counter.append(1)
        return loss
    return closure


def _with_torch(evaluations: int) -> torch.Tensor:
    f, x = _problem(), torch.zeros(N, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([x], lr=1, max_iter=evaluations, max_eval=evaluations, history_size=4,
                                  tolerance_grad=0, tolerance_change=0,
                                  line_search_fn="strong_wolfe")
    counter = []
    closure = _closure(f, x, counter)

    def zeroing():
        optimizer.zero_grad()
        return closure()
    optimizer.step(zeroing)
    return x.detach()


def test_follows_torchs_lbfgs_step_for_step_past_a_full_history():
    f, x, counter = _problem(), torch.zeros(N, dtype=torch.float64, requires_grad=True), []
    lbfgs.minimise(_closure(f, x, counter), x, history=4, evaluations=25)
    assert len(counter) == 25
    torch.testing.assert_close(x.detach(), _with_torch(25), rtol=0, atol=1e-12)


BOX = (-0.2, 0.2)  # the test problem's unbounded minimum lies outside this box
MINIMISERS = ["strong-wolfe", "backtracking"]


def _minimise(kind, closure, x, evaluations, bounds=None):
    """One round of either minimiser, history 4."""
    if kind == "strong-wolfe":
        lbfgs.minimise(closure, x, history=4, evaluations=evaluations, bounds=bounds)
    else:
        lbfgs.minimise_backtracking(closure, x, history=4, evaluations=evaluations, bounds=bounds)


@pytest.mark.parametrize("kind", MINIMISERS)
def test_with_bounds_every_evaluated_point_lies_inside_them(kind):
    f, x, seen = _problem(), torch.zeros(N, dtype=torch.float64, requires_grad=True), []
    closure = _closure(f, x, [])

    def watched():
        seen.append(x.detach().clone())
        return closure()
    _minimise(kind, watched, x, 40, BOX)
    assert len(seen) > 5
    assert all(float(point.abs().max()) <= 0.2 for point in seen)


@pytest.mark.parametrize("kind", MINIMISERS)
def test_with_bounds_rounds_restarted_where_one_stopped_end_at_the_minimum_in_the_box(kind):
    f, x, counter = _problem(), torch.zeros(N, dtype=torch.float64, requires_grad=True), []
    closure = _closure(f, x, counter)
    for _ in range(20):  # as the engine does: a round whose line search fails is started afresh
        _minimise(kind, closure, x, 300, BOX)
    _assert_minimum_in_the_box(f, x)


def _assert_minimum_in_the_box(f, x):
    x.grad = None
    f(x).backward()
    low, high = x.detach() <= BOX[0], x.detach() >= BOX[1]
    assert low.any() and high.any()  # the box binds on both sides
    # Optimality in a box: no gradient inside, and at a bound only a pull further out.
    assert float(x.grad[~low & ~high].abs().max()) < 1e-6
    assert bool((x.grad[low] >= 0).all()) and bool((x.grad[high] <= 0).all())


def test_backtracking_holds_values_at_a_bound_and_reaches_the_minimum_in_the_box_in_one_round():
    # Moving a value off a bound it is pressed against goes uphill, unseen by the projected
    # gradient: such values stay where they are, so no trial is spent on them.
    f, x = _problem(), torch.zeros(N, dtype=torch.float64, requires_grad=True)
    lbfgs.minimise_backtracking(_closure(f, x, []), x, history=4, evaluations=40, bounds=BOX)
    _assert_minimum_in_the_box(f, x)


@pytest.mark.parametrize("kind", MINIMISERS)
def test_stops_after_one_evaluation_at_a_stationary_point(kind):
    x, counter = torch.zeros(N, dtype=torch.float64, requires_grad=True), []
    _minimise(kind, _closure(lambda v: v.pow(2).sum(), x, counter), x, 50)
    assert counter == [1] and not x.detach().any()


@pytest.mark.parametrize("kind", MINIMISERS)
def test_reaches_the_minimum_where_the_gradient_vanishes(kind):
    f, x = _problem(), torch.zeros(N, dtype=torch.float64, requires_grad=True)
    _minimise(kind, _closure(f, x, []), x, 80)
    x.grad = None
    f(x).backward()
    assert float(x.grad.abs().max()) < 1e-6


@pytest.mark.parametrize("kind", MINIMISERS)
@pytest.mark.parametrize("overflow", [math.inf, math.nan])
def test_a_trial_whose_loss_is_not_finite_is_refused_and_a_shorter_one_tried(kind, overflow):
    # Minimum at 2, but no finite loss past 1.5: the curvature's full steps land out there at first.
    def f(v):
        return torch.where(v.max() > 1.5, torch.tensor(overflow, dtype=v.dtype), (v - 2).pow(2).sum())
    x, losses = torch.zeros(N, dtype=torch.float64, requires_grad=True), []
    closure = _closure(f, x, [])
    _minimise(kind, lambda: losses.append(float(closure().detach())) or torch.tensor(losses[-1]), x, 30)
    assert not all(map(math.isfinite, losses))
    assert float(x.detach().max()) <= 1.5 and float(f(x.detach())) < min(losses[:2])


def _fp16_backward(v):
    """(v − 2)² summed, plus a small term past 1.5 whose gradient passes float16 scaled by 1e5, as a
    heavily weighted loss's does in an fp16 backward: past 1.5 the loss is finite, the gradient inf."""
    return (v - 2).pow(2).sum() + 1e5 * (torch.relu(v - 1.5) * 1e-6).half().float().sum()


@pytest.mark.parametrize("kind", MINIMISERS)
def test_a_trial_whose_gradient_overflows_is_refused_though_its_loss_is_lower(kind):
    x, seen = torch.zeros(N, dtype=torch.float64, requires_grad=True), []
    closure = _closure(_fp16_backward, x, [])

    def watched():
        seen.append(x.detach().clone())
        return closure()
    _minimise(kind, watched, x, 30)
    assert any(float(point.max()) > 1.5 for point in seen)  # it was tried
    assert all(bool(point.isfinite().all()) for point in seen)  # and no NaN step followed
    first_steps = min(float(_fp16_backward(point)) for point in seen[:2])
    assert float(x.detach().max()) <= 1.5 and float(_fp16_backward(x.detach())) < first_steps


def test_a_pair_without_positive_curvature_is_not_stored():
    curvature = lbfgs.empty_curvature(3, torch.zeros(4))
    lbfgs.remember(curvature, torch.ones(4), -torch.ones(4))
    assert int(curvature.count) == 0 and not curvature.pairs.any() and not curvature.sy.any()
    lbfgs.remember(curvature, torch.ones(4), torch.ones(4))
    assert int(curvature.count) == 1 and curvature.sy[0, 0] == 4.0


def test_the_oldest_pair_is_replaced_once_the_history_is_full():
    curvature = lbfgs.empty_curvature(2, torch.zeros(3))
    for scale in (1.0, 2.0, 3.0):
        lbfgs.remember(curvature, scale * torch.ones(3), torch.ones(3))
    assert int(curvature.count) == 3
    assert curvature.pairs[:2, 0].tolist() == [3.0, 2.0]  # slot 0 rewritten by the third pair
    assert curvature.sy.tolist() == [[9.0, 9.0], [6.0, 6.0]]  # s_i · y_j by slot, the new row included


def _two_loop(pairs: list[tuple[torch.Tensor, torch.Tensor]], gradient: torch.Tensor) -> torch.Tensor:
    """The textbook two-loop recursion (Nocedal and Wright, algorithm 7.4), oldest pair first."""
    q, alphas = gradient.clone(), []
    for s, y in reversed(pairs):
        alpha = s.dot(q) / y.dot(s)
        q -= alpha * y
        alphas.append(alpha)
    s, y = pairs[-1]
    r = q * s.dot(y) / y.dot(y)
    for (s, y), alpha in zip(pairs, reversed(alphas), strict=True):
        r += s * (alpha - y.dot(r) / y.dot(s))
    return -r


@pytest.mark.parametrize("stored", [1, 3, 7])  # part of the slots, all of them, wrapped round the ring
def test_the_direction_is_the_two_loop_recursions(stored):
    gen = torch.Generator().manual_seed(stored)
    curvature, pairs = lbfgs.empty_curvature(4, torch.zeros(N, dtype=torch.float64)), []
    for _ in range(stored):
        s = torch.randn(N, generator=gen, dtype=torch.float64)
        y = s + 0.3 * torch.randn(N, generator=gen, dtype=torch.float64)
        lbfgs.remember(curvature, s, y)
        pairs = [*pairs, (s, y)][-4:]
    gradient = torch.randn(N, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(lbfgs.direction(curvature, gradient), _two_loop(pairs, gradient),
                               rtol=1e-10, atol=1e-12)


def test_with_no_pairs_the_direction_is_the_negative_gradient():
    gradient = torch.arange(5.0)
    assert lbfgs.direction(lbfgs.empty_curvature(3, gradient), gradient).tolist() == (-gradient).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_direction_on_the_gpu_reads_nothing_back_to_the_host():
    gen = torch.Generator().manual_seed(1)
    curvature = lbfgs.empty_curvature(4, torch.zeros(64, device="cuda"))
    for _ in range(6):
        step = torch.randn(64, generator=gen).cuda()
        lbfgs.remember(curvature, step, step + 0.1 * torch.randn(64, generator=gen).cuda())
    gradient = torch.randn(64, generator=gen).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        towards = lbfgs.direction(curvature, gradient)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(towards.dot(gradient)) < 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_storing_a_pair_on_the_gpu_reads_nothing_back_to_the_host():
    curvature = lbfgs.empty_curvature(4, torch.zeros(64, device="cuda"))
    step = torch.ones(64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            lbfgs.remember(curvature, step, 2 * step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(curvature.count) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", MINIMISERS)
@pytest.mark.parametrize(("bounds", "rounds"), [(None, 1), (BOX, 3)])
def test_on_the_gpu_the_replayed_updates_follow_the_cpus_iterates(kind, bounds, rounds):
    # In the box a round's line search can fail (the CPU's first stops after 14 evaluations), so
    # there the engine's restarts run too; unbounded, one round (later ones part on rounding).
    f, final, spent = _problem(), {}, {}
    for device in ("cpu", "cuda"):
        counter = []
        x = torch.zeros(N, dtype=torch.float64, device=device, requires_grad=True)
        for _ in range(rounds):
            _minimise(kind, _closure(lambda v: f(v.cpu()), x, counter), x, 40, bounds)
        final[device], spent[device] = x.detach().cpu(), len(counter)
    assert spent["cuda"] == spent["cpu"] > 20
    # Converged in the box, a point is fixed only to about √ε (the losses differ in their last
    # digits there, and the GPU rounds its sums differently); a replay gone wrong is off by far more.
    torch.testing.assert_close(final["cuda"], final["cpu"], rtol=0, atol=1e-7)


def test_an_update_that_cannot_be_recorded_keeps_running_as_it_is(monkeypatch):
    class Refusing:  # what torch.cuda.graph does with an operation that cannot be captured
        def __init__(self, graph):
            pass

        def __enter__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", Refusing)
    calls = []

    def update():
        calls.append(1)
        return torch.zeros(2), torch.zeros(1)
    run = lbfgs.replayed(update, use_graph=True)
    for _ in range(4):
        run()
    assert len(calls) == 4


@pytest.mark.parametrize("kind", MINIMISERS)
def test_never_evaluates_more_than_its_budget(kind):
    f, x, counter = _problem(), torch.zeros(N, dtype=torch.float64, requires_grad=True), []
    for evaluations in (1, 2, 7):
        counter.clear()
        _minimise(kind, _closure(f, x, counter), x, evaluations)
        assert len(counter) <= evaluations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_backtracking_on_the_gpu_reads_back_only_every_check(monkeypatch):
    monkeypatch.setattr(lbfgs, "CUDA_GRAPHS", False)  # recording a graph synchronises, once
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(N, N, generator=gen, dtype=torch.float64)
    a = (a @ a.T / N + 0.1 * torch.eye(N, dtype=torch.float64)).cuda()
    x, counter = torch.zeros(N, dtype=torch.float64, device="cuda", requires_grad=True), []
    closure = _closure(lambda v: 0.5 * v @ a @ v - v.sum() + 0.1 * v.pow(4).sum(), x, counter)
    evaluations = 2 * lbfgs.CHECK_EVERY + 2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lbfgs.minimise_backtracking(closure, x, history=4, evaluations=evaluations)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(counter) == evaluations
    # Iterations 0, CHECK_EVERY and 2·CHECK_EVERY look at the state; nothing else waits for the GPU.
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 3
