"""Q4 elasticity and SIMP topology optimization: the 88-line reference values, and the
compliance gradient of the PDELayer adjoint against finite differences."""

from __future__ import annotations

import pathlib
import runpy
import zlib

import pytest
import torch

from difflayers import pde
from difflayers.testing import check_grad

DTYPE = torch.float64
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_element_stiffness_is_symmetric_with_rigid_modes():
    KE = pde.q4_stiffness(0.3)
    torch.testing.assert_close(KE, KE.T)
    eig = torch.linalg.eigvalsh(KE)
    assert (eig[:3].abs() < 1e-12).all() and (eig[3:] > 1e-3).all()  # two translations, one rotation


def test_mbb_first_iteration_compliance():
    fem = pde.ElasticityQ4.mbb(60, 20)
    c = pde.compliance(fem, torch.full((20, 60), 0.5, dtype=DTYPE))
    assert float(c) == pytest.approx(1007.0221, abs=1e-4)


def test_matrix_free_and_assembled_stiffness_agree():
    fem = pde.ElasticityQ4.cantilever(6, 4)
    x = torch.rand(2, 4, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    u = torch.randn(2, fem.free.numel(), dtype=DTYPE)
    K = fem.stiffness(x)
    torch.testing.assert_close(K.mv(u), fem.apply(u, x))
    torch.testing.assert_close(K.matrix, K.matrix.transpose(1, 2))


def test_block_tridiagonal_stiffness_and_block_cholesky_match_dense():
    fem = pde.ElasticityQ4.mbb(12, 5)
    gen = torch.Generator().manual_seed(4)
    x = 0.1 + 0.9 * torch.rand(3, 5, 12, dtype=DTYPE, generator=gen)
    dense, blocks = fem.stiffness(x), fem.stiffness_blocks(x)
    u = torch.randn(3, fem.free.numel(), dtype=DTYPE, generator=gen)
    torch.testing.assert_close(blocks.mv(u), dense.mv(u))
    sol = pde.BlockCholesky().solve(blocks, u)
    torch.testing.assert_close(sol.value, torch.linalg.solve(dense.matrix, u[..., None])[..., 0], rtol=1e-9, atol=1e-9)
    assert (sol.status == 0).all()


def test_compliance_gradient_matches_finite_differences_and_closed_form():
    fem = pde.ElasticityQ4.cantilever(8, 4)
    gen = torch.Generator().manual_seed(1)
    x = (0.3 + 0.6 * torch.rand(2, 4, 8, dtype=DTYPE, generator=gen)).requires_grad_(True)
    layer = pde.compliance_layer(fem)
    check_grad(lambda x: pde.compliance(fem, x, layer), (x,), rtol=1e-6)
    c = pde.compliance(fem, x, layer)
    (dc,) = torch.autograd.grad(c.sum(), x)
    # Self-adjoint closed form: dc/dx_e = -p x_e^(p-1) (E0 - Emin) u_e^T K_e u_e.
    with torch.no_grad():
        u = layer(x, u0=x.new_zeros(2, fem.free.numel()))
        closed = -fem.penal * x.pow(fem.penal - 1) * (fem.E0 - fem.Emin) * fem.element_energy(u)
    torch.testing.assert_close(dc, closed, rtol=1e-9, atol=1e-12)


def test_density_filter_is_normalized_and_self_adjoint():
    H = pde.DensityFilter(7, 5, 2.5)
    ones = torch.ones(1, 5, 7, dtype=DTYPE)
    torch.testing.assert_close(H.density(ones), ones)
    a, b = torch.randn(2, 1, 5, 7, dtype=DTYPE)
    torch.testing.assert_close((H.density(a) * b).sum(), (a * H.density_adjoint(b)).sum())


def test_optimality_criteria_meets_the_volume_batched():
    gen = torch.Generator().manual_seed(2)
    x = torch.full((3, 6, 9), 0.4, dtype=DTYPE)
    dc = -torch.rand(3, 6, 9, dtype=DTYPE, generator=gen)
    x_new = pde.optimality_criteria(x, dc, torch.ones_like(dc), 0.4)
    torch.testing.assert_close(x_new.mean(dim=(1, 2)), torch.full((3,), 0.4, dtype=DTYPE), rtol=0, atol=2e-3)
    assert ((x_new - x).abs() <= 0.2 + 1e-12).all() and (x_new >= 0).all() and (x_new <= 1).all()


def test_example_quick(tmp_path, capsys):
    example = runpy.run_path(str(ROOT / "examples" / "topology_optimization.py"))
    png = tmp_path / "design.png"
    result = example["main"](quick=True, png=str(png))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("final compliance") and float(lines[-1].split()[-1]) == pytest.approx(
        result["compliance"], rel=1e-4)
    history = result["history"]
    assert history[-1] < 0.5 * history[0]
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])
    assert len(raw) == (10 * 4) * (1 + 30 * 4)  # 4x upscaled 10 x 30 grayscale rows, one filter byte each


def test_mbb_final_compliance_sensitivity_filter():
    fem = pde.ElasticityQ4.mbb(60, 20)
    result = pde.topology_optimization(fem, volfrac=0.5, rmin=1.5, filter="sensitivity")
    assert float(result.history[0, 0]) == pytest.approx(1007.0221, abs=1e-4)
    assert float(result.compliance[0]) == pytest.approx(203.19, rel=1e-3)
    assert result.iterations == 94


def test_compliance_taylor_rates():
    import math

    from difflayers.testing import taylor_test

    fem = pde.ElasticityQ4.cantilever(8, 4)
    gen = torch.Generator().manual_seed(3)
    x = 0.3 + 0.6 * torch.rand(2, 4, 8, dtype=DTYPE, generator=gen)
    layer = pde.compliance_layer(fem)
    result = taylor_test(lambda x: pde.compliance(fem, x, layer).sum(), x,
                         0.2 * torch.randn(2, 4, 8, dtype=DTYPE, generator=gen), h0=0.5, steps=5)
    rates = [r for r in result.rate1 if not math.isnan(r)]
    assert len(rates) == 4 and min(rates) >= 1.9, str(result)


def test_cantilever_density_filter_keeps_the_volume_and_improves():
    fem = pde.ElasticityQ4.cantilever(20, 10)
    result = pde.topology_optimization(fem, volfrac=0.4, rmin=1.5, filter="density", max_iterations=8, batch=2)
    history = result.history
    assert history.shape == (8, 2) and torch.equal(history[:, 0], history[:, 1])  # batched designs agree
    assert (history[1:, 0] <= history[:-1, 0] * 1.001).all() and history[-1, 0] < 0.6 * history[0, 0]
    torch.testing.assert_close(result.density.mean(dim=(1, 2)), torch.full((2,), 0.4, dtype=DTYPE), rtol=0,
                               atol=1e-3)
