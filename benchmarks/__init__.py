"""Measurements of allcore on this checkout (docs/PERFORMANCE.md, docs/CELLS.md, ...). Not part of the
installed package: run them from the repository root as modules, ``python -m benchmarks.run ...``,
so they import this checkout's ``allcore``/``pipelines`` and each other (``benchmarks.run``) with
no ``sys.path`` changes; a benchmark that starts another in a child process does it the same way.
"""
