"""Compatibility shim: the numpy front end of the bnorm C API now lives in the package
``bnorm`` (python/bnorm/numpy.py, documented there); this module re-exports it unchanged, so
``import bnorm_ctypes as bn`` keeps working.

The library is found as bnorm._lib documents: the environment variable BNORM_LIBRARY (if set it
must load), beside the installed package, the repository's build trees (build/release/lib,
build/lib, build/test-release/lib), then ctypes.util.find_library("bnorm").
"""

from bnorm.numpy import *  # noqa: F401,F403  (the public names, __all__ of bnorm.numpy)
from bnorm.numpy import __all__  # noqa: F401
from bnorm.numpy import (  # noqa: F401  private helpers that older callers may use
    _LAYOUT_CODE, _activation, _counter, _output_like, _ptr, _vector)
from bnorm._lib import check as _check  # noqa: F401
