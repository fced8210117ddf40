"""Triton kernels for fastvid's fused ConvLSTM / ConvGRU cells.

This package is installed as ``fastvid.triton_kernels`` (an unrelated PyPI package owns the
top-level name ``triton_kernels``), so import it as ``from fastvid.triton_kernels import recurrent``
in installed code; modules inside it use only relative or stdlib imports for their siblings.

It is kept light on purpose: nothing is imported here. ``recurrent`` imports Triton lazily-guarded
and sets ``recurrent.AVAILABLE = False`` (defining no ops) when Triton is missing.

Minimum Triton: MIN_TRITON_VERSION, the oldest release every kernel here is verified to compile with
for sm_80 to sm_100 (tests/test_triton_compile.py, FASTVID_TRITON_MIN_PATH). Older releases are
untested; Triton 3.6's ``tl.dot`` needs the explicit fp64 ``out_dtype`` the kernels pass.
"""

MIN_TRITON_VERSION = (3, 6)
