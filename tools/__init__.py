"""Benchmarks, sweeps and exports, and the model builders they share with the tests (`zoo`, `llm_models`).

Run each from the repository root as a module, e.g. `python -m tools.bench_prune --quick`; the tests
import `tools.zoo` through pytest's `pythonpath = ["."]`. Not part of the installed package."""
