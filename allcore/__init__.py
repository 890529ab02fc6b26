"""allcore: domain library for ALL blood-smear image classification.

Nothing in this package imports Ray: every function runs and is tested in a plain Python
process. Ray wiring lives in ``pipelines/``.
"""

__version__ = "0.1.0"
