"""Only the optional C extension lives here; everything else is in pyproject.toml.

(setuptools' ``ext-modules`` table in pyproject.toml is still experimental.)
Without a C compiler the build skips the extension and sigtrace runs on its
pure-Python histogram; ``sigtrace.metrics.SPEEDUPS`` says which one is in use.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("sigtrace._speedups", sources=["sigtrace/_speedups.c"], optional=True),
    ]
)
