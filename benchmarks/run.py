"""Run a named benchmark: ``python -m benchmarks.run NAME [options]``.

Names: see ``BENCHMARKS``. Each prints a markdown table (also written to
``--output`` when given) of median times, peak memory, errors and ratios.
"""

from __future__ import annotations

import importlib

from ._harness import argument_parser, emit

BENCHMARKS = {
    "ridge_hypergradient": "benchmarks.ridge_hypergradient",
    "qp_layer": "benchmarks.qp_layer",
    "conic_suites": "benchmarks.conic_suites",
    "sinkhorn": "benchmarks.sinkhorn",
    "sparse_ot": "benchmarks.sparse_ot",
    "pde_layer": "benchmarks.pde_layer",
    "bilevel_estimators": "benchmarks.bilevel_estimators",
    "bilevel_memory": "benchmarks.bilevel_memory",
    "precision": "benchmarks.precision",
    "compile": "benchmarks.compile",
}


def main(argv=None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    args = parser.parse_args(argv)
    module = importlib.import_module(BENCHMARKS[args.name])
    table = module.run(repeats=args.repeats, device=args.device, quick=args.quick)
    emit(table, args.output)


if __name__ == "__main__":
    main()
