"""L-BFGS whose bookkeeping stays on the device, recorded once as a CUDA graph on a GPU.

torch.optim.LBFGS's two-loop recursion turns a GPU scalar into a Python number twice per stored
pair and iteration (100 waits for the GPU per evaluation at history 50; on an H200 a 512 px
evaluation took 6.60 ms with it, 5.36 ms without, both in bf16 with CUDA graphs). Here the
pairs live in one matrix and the direction is the compact form of Byrd, Nocedal and Schnabel
(1994): a few matrix products and two triangular solves, the same direction as the two-loop
recursion in exact arithmetic. Every shape is fixed (all `history` slots take part, empty ones
as zero rows that decouple from the rest) and the ring's position is a device counter, so one
iteration's update — store the pair, find the next direction and its slope — is the same kernels
every time: on a GPU it is recorded once and replayed, where launching its dozens of small
operations one by one from Python left the GPU idle for longer than the replayed loss evaluation
itself took at 256 px (H100: 2.93 ms per L-BFGS evaluation where replaying the loss evaluation
takes 1.36 ms; 2.28 ms with the update replayed too, see docs/benchmarks.md).
`minimise` otherwise follows torch's L-BFGS step for step (first step 1/|g|₁, pairs with
s·y ≤ 1e-10 skipped, initial inverse Hessian s·y / y·y, torch's own strong-Wolfe line search), which
reads a loss and a slope back to the host every evaluation. `minimise_backtracking` chooses its
steps on the device instead, so that a GPU never waits for the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.optim.lbfgs import _strong_wolfe

MIN_CURVATURE = 1e-10  # a pair with s·y at or below this would break the update: skipped, as in torch
CUDA_GRAPHS = True  # on a GPU, each iteration's update is recorded once and replayed (see replayed)
ARMIJO = 1e-4  # backtracking: the share of the predicted decrease a step must achieve (torch's c1)
SHRINK = (0.1, 0.5)  # backtracking: a refused step is cut to this range of itself
CHECK_EVERY = 16  # backtracking: iterations between the host's looks at whether a step still moves


@dataclass
class Curvature:
    """The newest curvature pairs in the slots of one matrix, and their mutual products by slot."""

    pairs: torch.Tensor  # 2m × n: rows [0, m) the steps s, rows [m, 2m) the gradient changes y
    sy: torch.Tensor  # m × m float64: s_i · y_j
    yy: torch.Tensor  # m × m float64: y_i · y_j
    count: torch.Tensor  # pairs stored so far (int64 on the device); pair p lives in slot p mod m
    scale: torch.Tensor  # s·y / y·y of the newest pair (float64 on the device): the initial inverse Hessian
    slots: torch.Tensor  # 0 … m − 1 on the device

    @property
    def size(self) -> int:
        return self.sy.shape[0]


def empty_curvature(size: int, gradient: torch.Tensor) -> Curvature:
    """Room for `size` pairs of vectors shaped like the flat `gradient`."""
    device = gradient.device
    small = torch.zeros(size, size, dtype=torch.float64, device=device)
    return Curvature(gradient.new_zeros(2 * size, gradient.numel()), small, small.clone(),
                     torch.zeros((), dtype=torch.int64, device=device),
                     torch.ones((), dtype=torch.float64, device=device),
                     torch.arange(size, device=device))


def remember(curvature: Curvature, step: torch.Tensor, change: torch.Tensor,
             wanted: torch.Tensor | None = None) -> None:
    """Store the pair (s, y) in place of the oldest once full; nothing is stored if s·y is tiny
    (or where the boolean device scalar `wanted` says no).

    Decided on the device (a masked write), so that the update reads nothing back to the host.
    """
    m = curvature.size
    sy = change.dot(step).double()
    keep = sy > MIN_CURVATURE if wanted is None else (sy > MIN_CURVATURE) & wanted
    slot = torch.remainder(curvature.count, m).view(1)
    rows = torch.cat([slot, slot + m])
    steps, changes = curvature.pairs[:m], curvature.pairs[m:]
    at_slot = curvature.slots == slot
    # The slot's row and column of both products, its own pair's products on the diagonal.
    row = torch.where(at_slot, sy, (changes @ step).double())  # s_new · y_j
    column = torch.where(at_slot, sy, (steps @ change).double())  # s_j · y_new
    own_yy = change.dot(change).double()
    yy = torch.where(at_slot, own_yy, (changes @ change).double())
    for matrix, new_row, new_column in ((curvature.sy, row, column), (curvature.yy, yy, yy)):
        old_row = matrix.index_select(0, slot)[0]
        matrix.index_copy_(0, slot, torch.where(keep, new_row, old_row)[None])
        old_column = matrix.index_select(1, slot)[:, 0]
        matrix.index_copy_(1, slot, torch.where(keep, new_column, old_column)[:, None])
    new_pair = torch.where(keep, torch.stack([step, change]), curvature.pairs.index_select(0, rows))
    curvature.pairs.index_copy_(0, rows, new_pair)
    curvature.scale.copy_(torch.where(keep, sy / own_yy, curvature.scale))
    curvature.count.add_(keep.long())


def direction(curvature: Curvature, gradient: torch.Tensor) -> torch.Tensor:
    """−H g for the L-BFGS inverse Hessian H of the stored pairs (compact form, all on the device).

    With S, Y the pairs as rows (oldest first), R the upper triangle of S Yᵀ, D its diagonal and
    γ the scale: H g = γ g + Sᵀ w − γ Yᵀ u, where R u = S g and Rᵀ w = (D + γ Y Yᵀ) u − γ Y g.
    Empty slots are zero rows: with a 1 on R's diagonal their u and w are 0 and the rest is as if
    they were not there.
    """
    m = curvature.size
    steps, changes = curvature.pairs[:m], curvature.pairs[m:]
    age = torch.remainder(curvature.slots + curvature.count, m)  # slots oldest first (empty ones lead)
    empty = (curvature.slots >= curvature.count).double()[age]
    sy = curvature.sy[age][:, age]
    yy = curvature.yy[age][:, age]
    sg = (steps @ gradient).double()[age]
    yg = (changes @ gradient).double()[age]
    gamma = curvature.scale
    r = torch.triu(sy) + torch.diag(empty)
    u = torch.linalg.solve_triangular(r, sg[:, None], upper=True)[:, 0]
    rhs = torch.diagonal(sy) * u + gamma * (yy @ u) - gamma * yg
    w = torch.linalg.solve_triangular(r.T, rhs[:, None], upper=False)[:, 0]
    by_slot = torch.zeros(2, m, dtype=torch.float64, device=gradient.device)
    by_slot[:, age] = torch.stack([w, -gamma * u])
    return -(gamma.to(gradient.dtype) * gradient + by_slot.to(gradient.dtype).view(-1) @ curvature.pairs)


Output = TypeVar("Output")


def replayed(update: Callable[[], Output], use_graph: bool) -> Callable[[], Output]:
    """`update` run as it is on its first call; on a GPU, from the second call on, recorded once
    as a CUDA graph and replayed (it must read and write only tensors that stay in place).

    The first, plain call is real work that also sets up cuBLAS before the recording; an update
    that cannot be recorded keeps running as it is.
    """
    if not use_graph:
        return update
    graph: torch.cuda.CUDAGraph | None = None
    output: Output | None = None
    calls, failed = 0, False

    def run() -> Output:
        nonlocal graph, output, calls, failed
        calls += 1
        if calls == 1 or failed:
            return update()
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    output = update()
            except RuntimeError:  # recording changes nothing: the plain update still works
                failed = True
                return update()
        graph.replay()
        return output
    return run


def _project(gradient: torch.Tensor, flat: torch.Tensor, bounds: tuple[float, float] | None) -> None:
    """Zero, in place, the gradient of each value held at a bound and pushed further out by it."""
    if bounds:
        gradient.masked_fill_(((flat <= bounds[0]) & (gradient > 0))
                              | ((flat >= bounds[1]) & (gradient < 0)), 0)


def _hold(towards: torch.Tensor, flat: torch.Tensor, gradient: torch.Tensor,
          bounds: tuple[float, float] | None) -> None:
    """Zero, in place, the direction of each value at a bound whose gradient presses it there (or
    that the direction pushes further out): the projected gradient counts such a value as 0, so
    moving it inwards would go uphill unseen by the slope."""
    if bounds:
        towards.masked_fill_(((flat <= bounds[0]) & ((gradient >= 0) | (towards < 0)))
                             | ((flat >= bounds[1]) & ((gradient <= 0) | (towards > 0))), 0)


def _evaluate(closure: Callable[[], torch.Tensor], x: torch.Tensor,
              bounds: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss at x, moved into the box first, and its projected gradient: a copy, as the closure may
    rewrite x.grad in place next time."""
    flat = x.detach().view(-1)
    if bounds:
        flat.clamp_(*bounds)
    with torch.enable_grad():
        loss = closure().detach().reshape(())
    gradient = x.grad.reshape(-1).clone()
    _project(gradient, flat, bounds)
    return loss, gradient


@torch.no_grad()
def minimise(closure: Callable[[], torch.Tensor], x: torch.Tensor, history: int, evaluations: int,
             bounds: tuple[float, float] | None = None) -> None:
    """Lower closure() by moving `x` in place until no descent step is found or `evaluations` are spent.

    `closure` returns the loss and leaves its gradient in x.grad (it may raise to stop the run).
    Each step is chosen by torch's strong-Wolfe search, from the loss and slope read on the host; a
    point whose loss or gradient is not finite (an overflow) is one the search steps back from.
    With `bounds`, x stays inside them (every point is projected into the box before it is
    evaluated, and each accepted step after it), the gradient of a value held at a bound and pushed
    outwards counts as 0 and the direction holds such a value where it is (see `_hold`), and
    curvature pairs record the step actually taken. Without that, the
    iterate drifts outside while the loss is taken at the clamped point, so the pairs and the line
    search's slopes describe moves that never happen (see docs/benchmarks.md).
    On a CUDA device each iteration's update is a CUDA graph replay (see `replayed`).
    """
    flat = x.detach().view(-1)
    spent = 0

    def evaluate() -> tuple[float, torch.Tensor]:
        nonlocal spent
        loss, gradient = _evaluate(closure, x, bounds)
        spent += 1
        value, finite = torch.stack([loss.double(), gradient.isfinite().all().double()]).tolist()
        if not (finite and math.isfinite(value)):
            # An overflow: its loss is +inf (a NaN would pass none of the search's comparisons) and
            # its slope unknown (NaN), so torch's search counts the point as too far and halves its
            # bracket towards the finite end (its cubic step falls back to the midpoint).
            return math.inf, gradient.fill_(math.nan)
        return value, gradient

    def along(start: torch.Tensor, step: float, towards: torch.Tensor) -> tuple[float, torch.Tensor]:
        flat.add_(towards, alpha=step)
        result = evaluate()
        flat.copy_(start)
        return result

    loss, gradient = evaluate()
    size = float(gradient.abs().sum())
    if not size > 0:  # already stationary
        return
    curvature = empty_curvature(history, gradient)
    # What the update reads and writes, in place: `gradient` at the new point, and the point and
    # gradient the step started from.
    previous, start = gradient.clone(), flat.clone()

    def update() -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step just taken, then find the next direction.

        Returns ([the gradient's slope along it, the step's largest move], the direction).
        """
        moved = flat - start
        remember(curvature, moved, gradient - previous)
        towards = direction(curvature, gradient)
        _hold(towards, flat, gradient, bounds)
        previous.copy_(gradient)
        start.copy_(flat)
        return torch.stack([gradient.dot(towards), moved.abs().max().to(gradient.dtype)]), towards

    advance = replayed(update, flat.is_cuda and CUDA_GRAPHS)
    towards, step = gradient.neg(), min(1.0, 1.0 / size)
    flags = torch.stack([gradient.dot(towards), gradient.new_ones(())])
    while spent < evaluations:
        slope_value, moved_value = flags.tolist()  # the update's one read back to the host
        if not moved_value > 0:  # the line search found no step
            return
        if not slope_value < 0:  # not a descent direction (or a zero gradient): nothing left to gain
            return
        # torch's search evaluates up to max_ls + 1 times
        loss, new_gradient, step, _ = _strong_wolfe(along, start, step, towards, loss, gradient,
                                                    slope_value, max_ls=evaluations - spent - 1)
        flat.add_(towards, alpha=step)
        if bounds:
            flat.clamp_(*bounds)
        if spent >= evaluations:
            return
        gradient.copy_(new_gradient)
        flags, towards = advance()
        step = 1.0


@torch.no_grad()
def minimise_backtracking(closure: Callable[[], torch.Tensor], x: torch.Tensor, history: int,
                          evaluations: int, bounds: tuple[float, float] | None = None) -> None:
    """Lower closure() like `minimise`, choosing each step on the device: the host never waits.

    Each evaluation is one trial: step 1 along the L-BFGS direction (1/|g|₁ before any pair),
    projected into the box. It is taken if it lowers the loss by ARMIJO of what the slope predicts;
    else the step is cut where the parabola through the two losses and the slope has its minimum
    (kept within SHRINK of it) and tried again. All of that is `torch.where` on device tensors, so on
    a GPU the host only queues the evaluation and the update (a CUDA graph replay each) while the
    GPU runs ahead; the host looks at the state every CHECK_EVERY iterations, to stop once no step
    moves the point. Taken points' losses only fall; `x` ends at the last one. A trial whose loss or
    gradient is not finite (an overflow) is refused and cut like one that does not lower the loss.
    `bounds` work as in `minimise`.
    """
    flat = x.detach().view(-1)
    loss, gradient = _evaluate(closure, x, bounds)
    spent = 1
    curvature = empty_curvature(history, gradient)
    # What the update reads and writes, in place: the point the trial stepped from with its loss
    # and gradient, the trial's loss and gradient, the direction and the step along it.
    start, trial_loss, trial_gradient = flat.clone(), loss.clone(), gradient.clone()
    towards = gradient.neg()

    def first_step() -> torch.Tensor:
        """1 along a direction built from pairs; 1/|g|₁ along the bare gradient (torch's choice)."""
        return torch.where(curvature.count > 0, 1.0, torch.clamp(1 / gradient.abs().sum(), max=1.0))

    step = first_step()

    def propose() -> torch.Tensor:
        """Put the next trial point into x; returns how far it lies from the start (0: stuck)."""
        flat.copy_(start + step * towards)
        if bounds:
            flat.clamp_(*bounds)
        return (flat - start).abs().max()

    def update() -> torch.Tensor:
        """Take or refuse the trial just evaluated, then propose the next one."""
        moved = flat - start
        expected = gradient.dot(moved)
        taken = ((trial_loss < loss) & (trial_loss <= loss + ARMIJO * expected)
                 & trial_gradient.isfinite().all())
        cut = torch.nan_to_num(-expected / (2 * (trial_loss - loss - expected)), nan=SHRINK[0])
        remember(curvature, moved, trial_gradient - gradient, taken)
        start.copy_(torch.where(taken, flat, start))
        gradient.copy_(torch.where(taken, trial_gradient, gradient))
        loss.copy_(torch.where(taken, trial_loss, loss))
        proposed = direction(curvature, gradient)
        steepest = -curvature.scale.to(gradient.dtype) * gradient  # descends even when projected
        # A refused trial whose projected step did not point downhill is not tried shorter: the
        # projection bent the direction uphill, so the next one is the (scaled) steepest descent.
        bent = ~taken & (expected >= 0)
        proposed = torch.where((gradient.dot(proposed) < 0) & ~bent, proposed, steepest)
        _hold(proposed, start, gradient, bounds)
        towards.copy_(torch.where(taken | bent, proposed, towards))
        step.copy_(torch.where(taken | bent, first_step(), step * cut.clamp(*SHRINK)))
        return propose()

    advance = replayed(update, flat.is_cuda and CUDA_GRAPHS)
    room = propose()
    while spent < evaluations:
        # The one read back, every CHECK_EVERY iterations (the first evaluation is no iteration).
        if (spent - 1) % CHECK_EVERY == 0 and not float(room) > 0:
            break
        evaluated = _evaluate(closure, x, bounds)  # into the update's own tensors, which it replays on
        trial_loss.copy_(evaluated[0])
        trial_gradient.copy_(evaluated[1])
        spent += 1
        room = advance()
    flat.copy_(start)
