"""Builds the optional C kernels (deltawise._fused); everything else is in pyproject.toml.

The extension is optional: where no C compiler is found, the install still succeeds and the
merge engine uses its torch path (same results, slower)."""

import sys

from setuptools import Extension, setup

# Contraction stays off so the kernels round exactly like the torch path (see _fused.c).
flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-math-errno"]

# _fused.c includes the other kernel files: they are dependencies, not separate sources
parts = [f"src/deltawise/_fused_{part}.c" for part in ("sparse", "stats", "rng", "select", "della", "finite")]
setup(ext_modules=[Extension("deltawise._fused", ["src/deltawise/_fused.c"], depends=parts, extra_compile_args=flags,
                             optional=True)])
