"""The batched inverse diffusion-coefficient example recovers every data set's coefficient."""

import pathlib
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_inverse_example_quick(capsys):
    example = runpy.run_path(str(ROOT / "examples" / "pde_inverse.py"))
    result = example["main"](quick=True)
    assert "relative error of k" in capsys.readouterr().out
    for before, after in zip(result["initial error"], result["final error"]):
        assert after < 0.5 * before
