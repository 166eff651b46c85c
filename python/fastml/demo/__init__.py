"""``fastml demo``: the whole ML-infrastructure loop on generated fraud data.

See :func:`fastml.demo.pipeline.run_demo`.
"""

from fastml.demo.pipeline import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
