"""L-BFGS whose search directions need no host synchronisation.

torch.optim.LBFGS's two-loop recursion turns a GPU scalar into a Python number twice per stored
pair and iteration (100 waits for the GPU per evaluation at history 50; on an H200 a 512 px
evaluation took 6.60 ms with it, 5.36 ms with this, both in bf16 with CUDA graphs). Here the
pairs live in one matrix and the direction is the compact form of Byrd, Nocedal and Schnabel
(1994): a few matrix products and two k×k triangular solves, the same direction as the two-loop
recursion in exact arithmetic (on the CPU it costs ~1% more per evaluation at 512 px). The
iteration otherwise follows torch's L-BFGS step for step (first step 1/|g|₁, pairs with s·y ≤ 1e-10
skipped, initial inverse Hessian s·y / y·y, torch's own strong-Wolfe line search).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.lbfgs import _strong_wolfe

MIN_CURVATURE = 1e-10  # a pair with s·y at or below this would break the update: skipped, as in torch


@dataclass
class Curvature:
    """The newest curvature pairs in the slots of one matrix, and their mutual products by slot."""

    pairs: torch.Tensor  # 2m × n: rows [0, m) the steps s, rows [m, 2m) the gradient changes y
    sy: torch.Tensor  # m × m float64: s_i · y_j
    yy: torch.Tensor  # m × m float64: y_i · y_j
    stored: int = 0
    oldest: int = 0  # slot of the oldest pair (slots fill from 0, then the oldest is overwritten)
    scale: torch.Tensor | None = None  # s·y / y·y of the newest pair: the initial inverse Hessian

    @property
    def size(self) -> int:
        return self.sy.shape[0]


def empty_curvature(size: int, gradient: torch.Tensor) -> Curvature:
    """Room for `size` pairs of vectors shaped like the flat `gradient`."""
    small = torch.zeros(size, size, dtype=torch.float64, device=gradient.device)
    return Curvature(gradient.new_zeros(2 * size, gradient.numel()), small, small.clone())


def remember(curvature: Curvature, step: torch.Tensor, change: torch.Tensor) -> bool:
    """Store the pair (s, y), replacing the oldest when full; False (nothing stored) if s·y is tiny."""
    sy = change.dot(step)
    if not sy > MIN_CURVATURE:  # the one host read of an update
        return False
    k, m = curvature.stored, curvature.size
    slot = curvature.oldest if k == m else k
    steps, changes = curvature.pairs[:k], curvature.pairs[m:m + k]
    yy = change.dot(change)
    curvature.sy[slot, :k] = changes @ step
    curvature.sy[:k, slot] = steps @ change
    curvature.yy[slot, :k] = curvature.yy[:k, slot] = changes @ change
    curvature.sy[slot, slot], curvature.yy[slot, slot] = sy, yy
    curvature.pairs[slot], curvature.pairs[m + slot] = step, change
    if k == m:
        curvature.oldest = (curvature.oldest + 1) % m
    else:
        curvature.stored += 1
    curvature.scale = (sy / yy).double()
    return True


def direction(curvature: Curvature, gradient: torch.Tensor) -> torch.Tensor:
    """−H g for the L-BFGS inverse Hessian H of the stored pairs (compact form, all on the device).

    With S, Y the pairs as rows (oldest first), R the upper triangle of S Yᵀ, D its diagonal and
    γ the scale: H g = γ g + Sᵀ w − γ Yᵀ u, where R u = S g and Rᵀ w = (D + γ Y Yᵀ) u − γ Y g.
    """
    k, m = curvature.stored, curvature.size
    if k == 0:
        return gradient.neg()
    steps, changes = curvature.pairs[:k], curvature.pairs[m:m + k]
    shift = -curvature.oldest  # rolls slot order into age order (slots fill in order until full)
    sy = torch.roll(curvature.sy[:k, :k], (shift, shift), (0, 1))
    yy = torch.roll(curvature.yy[:k, :k], (shift, shift), (0, 1))
    sg = torch.roll((steps @ gradient).double(), shift)
    yg = torch.roll((changes @ gradient).double(), shift)
    gamma = curvature.scale
    r = torch.triu(sy)
    u = torch.linalg.solve_triangular(r, sg[:, None], upper=True)[:, 0]
    rhs = torch.diagonal(sy) * u + gamma * (yy @ u) - gamma * yg
    w = torch.linalg.solve_triangular(r.T, rhs[:, None], upper=False)[:, 0]
    w, u = torch.roll(w, -shift).to(gradient.dtype), torch.roll(gamma * u, -shift).to(gradient.dtype)
    return -(gamma.to(gradient.dtype) * gradient + w @ steps - u @ changes)


@torch.no_grad()
def minimise(closure: Callable[[], torch.Tensor], x: torch.Tensor, history: int, line_search: bool,
             evaluations: int, bounds: tuple[float, float] | None = None) -> None:
    """Lower closure() by moving `x` in place until no descent step is found or `evaluations` are spent.

    `closure` returns the loss and leaves its gradient in x.grad (it may raise to stop the run).
    With `line_search`, each step is chosen by torch's strong-Wolfe search, else it is 1.
    With `bounds`, x stays inside them (every point is projected into the box before it is
    evaluated, and each accepted step after it), the gradient of a value held at a bound and pushed
    outwards counts as 0, and curvature pairs record the step actually taken. Without that, the
    iterate drifts outside while the loss is taken at the clamped point, so the pairs and the line
    search's slopes describe moves that never happen (see docs/benchmarks.md).
    """
    flat = x.detach().view(-1)
    spent = 0

    def evaluate() -> tuple[float, torch.Tensor]:
        nonlocal spent
        if bounds:
            flat.clamp_(*bounds)
        with torch.enable_grad():
            loss = float(closure().detach())
        spent += 1
        gradient = x.grad.reshape(-1).clone()  # a copy: x.grad may be rewritten in place next time
        if bounds:
            gradient.masked_fill_(((flat <= bounds[0]) & (gradient > 0))
                                  | ((flat >= bounds[1]) & (gradient < 0)), 0)
        return loss, gradient

    def along(start: torch.Tensor, step: float, towards: torch.Tensor) -> tuple[float, torch.Tensor]:
        flat.add_(towards, alpha=step)
        result = evaluate()
        flat.copy_(start)
        return result

    loss, gradient = evaluate()
    curvature = empty_curvature(history, gradient)
    size = float(gradient.abs().sum())
    if not size > 0:  # already stationary
        return
    towards, step = gradient.neg(), min(1.0, 1.0 / size)
    moved = previous = None
    while spent < evaluations:
        if previous is not None:
            remember(curvature, moved, gradient.sub(previous))
            towards, step = direction(curvature, gradient), 1.0
        slope = gradient.dot(towards)
        if not slope < 0:  # not a descent direction (or a zero gradient): nothing left to gain
            return
        previous, start = gradient, flat.clone()
        if line_search:
            loss, gradient, step, _ = _strong_wolfe(along, start, step, towards, loss, gradient,
                                                    slope, max_ls=evaluations - spent)
            flat.add_(towards, alpha=step)
            if bounds:
                flat.clamp_(*bounds)
        else:
            flat.add_(towards, alpha=step)
            loss, gradient = evaluate()
        moved = flat - start if bounds else towards.mul(step)
        if not float(moved.abs().max()) > 0:  # the line search found no step
            return
