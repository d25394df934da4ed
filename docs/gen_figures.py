"""Regenerate the figures of the documentation site from the examples' quick mode.

Each example in ``FIGURES`` runs as ``main(quick=True, plot=docs/assets/<name>.png)``
(matplotlib, Agg backend); the pages embed ``assets/<name>.png``.

    python docs/gen_figures.py                  # every figure
    python docs/gen_figures.py --if-missing     # only figures not yet in docs/assets/
    python docs/gen_figures.py hyper_cleaning   # selected examples
"""

from __future__ import annotations

import argparse
import pathlib
import runpy
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSETS = ROOT / "docs" / "assets"

# example script (examples/<name>.py) -> keyword arguments of its main() besides quick and plot
FIGURES = {
    "hyperparameters_diabetes_cancer": {"progress": False},
    "hyper_cleaning": {"progress": False},
    "optnet_digits": {},
    "deq_digits": {},
    "shortest_path": {},
    "portfolio": {},
    "bilevel_distributed": {},
}


def generate(name: str) -> pathlib.Path:
    path = ASSETS / f"{name}.png"
    example = runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="difflayers_docs")
    example["main"](quick=True, plot=str(path), **FIGURES[name])
    return path


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"examples to run, among {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--if-missing", action="store_true", help="skip figures that already exist")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(FIGURES))
    if unknown:
        parser.error(f"unknown example(s) {unknown}; expected names among {sorted(FIGURES)}")
    ASSETS.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))  # the examples import difflayers from the checkout
    written = []
    for name in args.names or list(FIGURES):
        if args.if_missing and (ASSETS / f"{name}.png").exists():
            continue
        start = time.perf_counter()
        written.append(generate(name))
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
