"""Benchmarks of sftkit; each script runs from the repository root as `python -m bench.NAME`.

Their shared parts: bench/synthetic.py (the synthetic data), bench/models.py (random-init models)
and bench/child.py (running a child process and reading its time and memory). The measurements and
the commands that made them: bench/RESULTS.md.
"""
