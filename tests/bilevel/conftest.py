"""Shared bilevel test problems with closed-form hypergradients (float64)."""

import dataclasses

import pytest
import torch


@dataclasses.dataclass
class Ridge:
    """Per-feature ridge: g(w, lam) = 1/(2n) ||X w - y||^2 + 1/2 sum lam_i w_i^2,
    f(w) = 1/(2n) ||Xv w - yv||^2; H = X^T X / n + diag(lam)."""

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor

    @property
    def n(self):
        return self.X.shape[0]

    def inner(self, w, lam):
        return 0.5 * ((self.X @ w - self.y) ** 2).sum() / self.n + 0.5 * (lam * w**2).sum()

    def outer(self, w, lam):
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).sum() / self.n

    def hessian(self, lam=None):
        lam = self.lam if lam is None else lam
        return self.X.T @ self.X / self.n + torch.diag(lam * torch.ones(self.X.shape[1], dtype=self.X.dtype))

    def solution(self, lam=None):
        return torch.linalg.solve(self.hessian(lam), self.X.T @ self.y / self.n)

    def outer_grad_w(self, w):
        return self.Xv.T @ (self.Xv @ w - self.yv) / self.n

    def hypergradient(self):
        """Closed form: dF/dlam = -w* * H^-1 df/dw."""
        w = self.solution()
        return -w * torch.linalg.solve(self.hessian(), self.outer_grad_w(w))

    def lipschitz(self):
        return float(torch.linalg.eigvalsh(self.hessian())[-1])

    def condition(self):
        eig = torch.linalg.eigvalsh(self.hessian())
        return float(eig[-1] / eig[0])

    def unrolled_hypergradient(self, lr, steps, last=None):
        """Exact derivative of `steps` gradient-descent steps from 0 (the last `last` of them
        differentiated): w <- w - lr (H w - b), D <- D - lr (H D + diag(w))."""
        H, b = self.hessian(), self.X.T @ self.y / self.n
        d = H.shape[0]
        w = torch.zeros(d, dtype=H.dtype)
        D = torch.zeros(d, d, dtype=H.dtype)
        start = 0 if last is None else steps - last
        for t in range(steps):
            if t >= start:
                D = D - lr * (H @ D + torch.diag(w))
            w = w - lr * (H @ w - b)
        return D.T @ self.outer_grad_w(w)


def make_ridge(n: int, d: int, cond: float, seed: int = 0) -> Ridge:
    """Ridge data whose inner Hessian has condition number about `cond`."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    U, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=dt))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    lam = 0.5 + 0.1 * torch.rand(d, generator=g, dtype=dt)
    spectrum = torch.logspace(0, torch.log10(torch.tensor(cond - 0.6)).item(), d, dtype=dt) - 0.5
    X = n**0.5 * (U * spectrum.sqrt()) @ V.T
    w_true = torch.randn(d, generator=g, dtype=dt)
    y = X @ w_true + torch.randn(n, generator=g, dtype=dt)
    Xv = torch.randn(n, d, generator=g, dtype=dt) @ (V * spectrum.sqrt()) @ V.T
    yv = Xv @ w_true + torch.randn(n, generator=g, dtype=dt)
    return Ridge(X, y, Xv, yv, lam)


@pytest.fixture(params=[10.0, 1e3], ids=["cond10", "cond1e3"])
def ridge(request):
    return make_ridge(60, 12, request.param)


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def ridge_factory():
    return make_ridge


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Many small problems: one intra-op thread (``one_thread`` in tests/conftest.py)."""
