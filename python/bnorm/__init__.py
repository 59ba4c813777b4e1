"""bnorm: batch normalization with PyTorch's semantics, over the C library libbnorm.so (ctypes).

Submodules (imported on demand, so ``import bnorm`` needs neither numpy nor torch):
  bnorm.numpy  forward_train / forward_eval / backward on float32 numpy arrays
  bnorm.torch  BatchNorm1d/2d/3d modules with autograd, and convert(model); fused batch norm
               + ReLU: batch_norm_relu, BatchNormReLU1d/2d/3d, convert(model, fuse_relu=True)

The library is found as bnorm._lib documents (BNORM_LIBRARY, beside the installed package, the
repository's build trees, then the system).
"""

from ._lib import BnormError, BnormLibraryNotFound, library_path, version

__all__ = ["BnormError", "BnormLibraryNotFound", "library_path", "version"]
