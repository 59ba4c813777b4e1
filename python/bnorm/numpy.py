"""bnorm.numpy: the bnorm C API (libbnorm.so) for float32 (and float16) numpy arrays, through
ctypes.

bnorm is batch normalization with PyTorch's semantics.  This module wraps the C functions of
include/bnorm/c_api.h for float32 numpy arrays, so that a PyTorch user can write::

    import bnorm.numpy as bn
    y, save_mean, save_invstd = bn.forward_train(
        x.numpy(), bn_module.weight.detach().numpy(), bn_module.bias.detach().numpy(),
        bn_module.running_mean.numpy(), bn_module.running_var.numpy(),
        bn_module.num_batches_tracked.view(1).numpy(), momentum=0.1, eps=1e-5)

Shapes and layouts
------------------
Activations (x, dy and the returned y, dx) always have PyTorch's *logical* shape
(N, C, *spatial) with 0 to 3 spatial dimensions (rank 2..5), exactly as the tensor's ``.shape``
in PyTorch.  The memory layout is read from the strides, as PyTorch does:

* ``"channels_first"``: the array is C-contiguous, memory (N, C, *spatial)
  (PyTorch's default ``torch.contiguous_format``);
* ``"channels_last"``: the channel axis is the fastest one, memory (N, *spatial, C), i.e.
  ``np.moveaxis(x, 1, -1)`` is C-contiguous.  This is what ``.numpy()`` of a tensor in
  ``torch.channels_last`` / ``torch.channels_last_3d`` gives, or of
  ``x.transpose(1, 2).contiguous().transpose(1, 2)`` for a 3-D (N, C, L) tensor.  A numpy
  array held in memory order (N, *spatial, C) is passed as ``np.moveaxis(a, -1, 1)`` (a view,
  no copy).

The ``layout`` argument is ``None`` (take the layout the strides show) or one of the two names
above, which is then checked against the strides.  An array whose strides are neither layout
raises ValueError: nothing is ever reinterpreted or silently copied, so the memory order cannot
be wrong.  When both layouts describe the same memory (C == 1, or no spatial extent) either name
is accepted.  Outputs y and dx are new arrays with x's shape *and* strides (so
``torch.from_numpy(y)`` has x's memory format), or the arrays given as ``out``, which must be
float32, writeable, of x's shape and layout (``out`` may be x itself: in place).

Per-channel vectors (weight, bias, running_mean, running_var, save_mean, save_invstd) are 1-D
float32 arrays of length C.  The state buffers that the library updates in place
(running_mean, running_var and num_batches_tracked in forward_train) must be C-contiguous and
writeable: they are written directly, never through a copy.  num_batches_tracked is a
one-element np.int64 array (e.g. ``module.num_batches_tracked.view(1).numpy()``).  Read-only
per-channel inputs that are not contiguous (e.g. a strided slice) are copied with
``np.ascontiguousarray``; that copy is the only conversion this module makes.  Any dtype other
than float32 (int64 for num_batches_tracked) raises TypeError: no silent down-casting.

float16 activations: x and dy (and out) may be np.float16 instead, all of one call the same
dtype; y and dx are then float16 (the library's fp16 path: statistics of the same values in
fp32, each output rounded once to nearest even), the per-channel vectors stay float32.  numpy
has no bfloat16 (use bnorm.torch for it); float64 raises TypeError (the library does not
support float64 tensors).

Errors
------
A nonzero status from the library raises BnormError(code, message), message being
``bnorm_last_error()``.  The library writes nothing when it fails: every output and state buffer
is left as it was.  Argument checks done here (types, shapes, layouts) raise TypeError or
ValueError before the library is called.

The library is found as bnorm._lib documents (BNORM_LIBRARY, beside the installed package,
the repository's build trees build/release/lib, build/lib, build/test-release/lib, then
ctypes.util.find_library).  python/bnorm_ctypes.py re-exports this module unchanged.
"""

import numpy as np

from . import _lib
from ._lib import BnormError, BnormLibraryNotFound, lib, library_path, load_library, version

__all__ = [
    "BnormError",
    "BnormLibraryNotFound",
    "CHANNELS_FIRST",
    "CHANNELS_LAST",
    "load_library",
    "library_path",
    "lib",
    "version",
    "forward_train",
    "forward_eval",
    "backward",
    "layout_of",
]

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
_LAYOUT_CODE = {CHANNELS_FIRST: 0, CHANNELS_LAST: 1}


# ----------------------------------------------------------------------------- argument checks

def _is_c_contig(a):
    return a.flags.c_contiguous


def layout_of(x):
    """The layouts x's strides allow, as a tuple: ("channels_first",), ("channels_last",), both
    (identical memory) or () (neither: not usable without a copy)."""
    if not isinstance(x, np.ndarray) or x.ndim < 2:
        return ()
    out = []
    if _is_c_contig(x):
        out.append(CHANNELS_FIRST)
    if _is_c_contig(np.moveaxis(x, 1, -1)):
        out.append(CHANNELS_LAST)
    return tuple(out)


def _activation(name, a, layout):
    """Check an activation array; return (layout_name, n, c, s)."""
    if not isinstance(a, np.ndarray):
        raise TypeError("%s must be a numpy.ndarray, got %s" % (name, type(a).__name__))
    if a.dtype not in _ACTIVATION_DTYPES:
        raise TypeError("%s must have dtype float32 or float16, got %s%s" % (
            name, a.dtype, " (the library does not support float64 tensors)"
            if a.dtype == np.float64 else ""))
    if not a.dtype.isnative:
        raise TypeError("%s must be in native byte order" % name)
    if not 2 <= a.ndim <= 5:
        raise ValueError("%s must have rank 2..5 (N, C, *spatial), got shape %s"
                         % (name, a.shape))
    if not a.flags.aligned:
        raise ValueError("%s must be aligned" % name)
    allowed = layout_of(a)
    if layout is None:
        if not allowed:
            raise ValueError(
                "%s with shape %s and strides %s is neither channels_first (C-contiguous) nor "
                "channels_last (channel axis fastest); pass np.ascontiguousarray(%s) or the "
                "tensor's .contiguous(memory_format=...)" % (name, a.shape, a.strides, name))
        layout = allowed[0]
    else:
        if layout not in _LAYOUT_CODE:
            raise ValueError("layout must be None, %r or %r, got %r"
                             % (CHANNELS_FIRST, CHANNELS_LAST, layout))
        if layout not in allowed:
            raise ValueError(
                "%s with shape %s and strides %s is not %s in memory (its strides allow: %s)"
                % (name, a.shape, a.strides, layout, ", ".join(allowed) or "neither layout"))
    n, c = int(a.shape[0]), int(a.shape[1])
    s = 1
    for d in a.shape[2:]:
        s *= int(d)
    return layout, n, c, s


def _same_activation(name, a, ref_name, ref, layout):
    if a.shape != ref.shape:
        raise ValueError("%s has shape %s but %s has shape %s" % (name, a.shape, ref_name, ref.shape))
    _activation(name, a, layout)
    if a.dtype != ref.dtype:
        raise TypeError("%s has dtype %s but %s has dtype %s (one dtype per call)"
                        % (name, a.dtype, ref_name, ref.dtype))


def _vector(name, v, c, required=False, writeable=False):
    """Per-channel vector: None (if not required) or a 1-D float32 array of length c.
    Returns the array to pass (the same object, or a contiguous copy of a read-only input)."""
    if v is None:
        if required:
            raise ValueError("%s is required" % name)
        return None
    if not isinstance(v, np.ndarray):
        raise TypeError("%s must be a numpy.ndarray of float32 or None, got %s"
                        % (name, type(v).__name__))
    if v.dtype != np.float32 or not v.dtype.isnative:
        raise TypeError("%s must have dtype float32, got %s" % (name, v.dtype))
    if v.ndim != 1 or v.shape[0] != c:
        raise ValueError("%s must have shape (%d,) (one value per channel), got %s"
                         % (name, c, v.shape))
    if writeable:
        if not (v.flags.c_contiguous and v.flags.aligned):
            raise ValueError("%s is updated in place and must be contiguous (no copy is made)"
                             % name)
        if not v.flags.writeable:
            raise ValueError("%s is updated in place and must be writeable" % name)
        return v
    if not (v.flags.c_contiguous and v.flags.aligned):
        v = np.ascontiguousarray(v)  # read-only input: a copy cannot hide an update
    return v


def _counter(v):
    if v is None:
        return None
    if not isinstance(v, np.ndarray):
        raise TypeError("num_batches_tracked must be a one-element numpy.ndarray of int64 or "
                        "None, got %s" % type(v).__name__)
    if v.dtype != np.int64 or not v.dtype.isnative:
        raise TypeError("num_batches_tracked must have dtype int64, got %s" % v.dtype)
    if v.size != 1:
        raise ValueError("num_batches_tracked must have exactly one element, got shape %s"
                         % (v.shape,))
    if not (v.flags.c_contiguous and v.flags.aligned and v.flags.writeable):
        raise ValueError("num_batches_tracked is updated in place and must be a writeable, "
                         "contiguous array (no copy is made)")
    return v


def _output_like(name, out, x, layout):
    """out if given (checked), else a new array of x's dtype, shape and strides."""
    if out is None:
        if layout == CHANNELS_FIRST:
            return np.empty(x.shape, dtype=x.dtype)
        mem = np.empty((x.shape[0],) + x.shape[2:] + (x.shape[1],), dtype=x.dtype)
        return np.moveaxis(mem, -1, 1)
    _same_activation(name, out, "x", x, layout)
    if not out.flags.writeable:
        raise ValueError("%s must be writeable" % name)
    return out


def _ptr(a):
    return None if a is None else a.ctypes.data


# The activations' dtypes and their bnorm_dtype codes (numpy has no bfloat16).
_ACTIVATION_DTYPES = {np.dtype(np.float32): _lib.FLOAT32, np.dtype(np.float16): _lib.FLOAT16}


def _eps(eps):
    return float(eps)


# ----------------------------------------------------------------------------- the calls

def forward_train(x, weight=None, bias=None, running_mean=None, running_var=None,
                  num_batches_tracked=None, momentum=0.1, eps=1e-5, layout=None, out=None):
    """Training forward (batch statistics), PyTorch's BatchNorm in train() mode.

    x: float32 (N, C, *spatial), rank 2..5, channels_first or channels_last in memory (see the
      module docstring; ``layout`` None takes it from the strides, else it is checked).
    weight, bias: float32 (C,) or None (affine=False: weight 1, bias 0).
    running_mean, running_var: float32 (C,), updated in place; both None for
      track_running_stats=False.  They receive momentum-weighted averages of the batch mean
      and of the *unbiased* batch variance.
    num_batches_tracked: np.int64 array of one element, incremented in place (or None; it is
      required when momentum is None).
    momentum: float in [0, 1], or None for the cumulative average (factor
      1/num_batches_tracked after the increment), as PyTorch.
    eps: > 0.
    out: optional float32 array for y (x's shape and layout; may be x itself).

    Returns (y, save_mean, save_invstd): y like x; save_mean and save_invstd float32 (C,) =
    batch mean and 1/sqrt(biased var + eps), what backward(training=True) needs.
    Raises BnormError from the library (e.g. N*spatial == 1, eps <= 0), nothing written then.
    """
    layout, n, c, s = _activation("x", x, layout)
    weight = _vector("weight", weight, c)
    bias = _vector("bias", bias, c)
    running_mean = _vector("running_mean", running_mean, c, writeable=True)
    running_var = _vector("running_var", running_var, c, writeable=True)
    num_batches_tracked = _counter(num_batches_tracked)
    mom = -1.0 if momentum is None else float(momentum)
    y = _output_like("out", out, x, layout)
    save_mean = np.empty(c, dtype=np.float32)
    save_invstd = np.empty(c, dtype=np.float32)
    _lib.check(_lib.lib().bnorm_forward_train_dt(
        _LAYOUT_CODE[layout], _ACTIVATION_DTYPES[x.dtype], n, c, s, _ptr(x), _ptr(weight),
        _ptr(bias),
        _ptr(running_mean), _ptr(running_var), _ptr(num_batches_tracked),
        mom, _eps(eps), _ptr(y), _ptr(save_mean), _ptr(save_invstd)), x.shape)
    return y, save_mean, save_invstd


def forward_eval(x, weight=None, bias=None, running_mean=None, running_var=None, eps=1e-5,
                 layout=None, out=None):
    """Inference forward with the running statistics, PyTorch's BatchNorm in eval() mode with
    track_running_stats=True.  (With track_running_stats=False PyTorch normalizes with batch
    statistics in eval mode too: use forward_train without running buffers.)

    x, weight, bias, layout, out, eps: as in forward_train.  running_mean, running_var:
    float32 (C,), required, not modified.  Returns y.
    """
    layout, n, c, s = _activation("x", x, layout)
    weight = _vector("weight", weight, c)
    bias = _vector("bias", bias, c)
    running_mean = _vector("running_mean", running_mean, c, required=True)
    running_var = _vector("running_var", running_var, c, required=True)
    y = _output_like("out", out, x, layout)
    _lib.check(_lib.lib().bnorm_forward_eval_dt(
        _LAYOUT_CODE[layout], _ACTIVATION_DTYPES[x.dtype], n, c, s, _ptr(x), _ptr(weight),
        _ptr(bias),
        _ptr(running_mean), _ptr(running_var), _eps(eps), _ptr(y)), x.shape)
    return y


def backward(dy, x, weight=None, save_mean=None, save_invstd=None, running_mean=None,
             running_var=None, eps=1e-5, training=True, layout=None, out=None,
             param_grads=True):
    """Gradients of the batch norm: returns (dx, dweight, dbias).

    dy, x: float32 arrays of the same shape and layout (see the module docstring).
    weight: float32 (C,) or None (weight 1).
    training=True: gradients through the batch statistics; save_mean and save_invstd (C,) are
      required, as returned by forward_train.
    training=False: statistics are constants, taken from running_mean/running_var (required);
      this is PyTorch's eval() mode with track_running_stats=True.
    out: optional float32 array for dx (dy's shape and layout; may be dy or x itself).
    param_grads: False skips dweight/dbias (returned as None).  dweight = sum(dy * xhat) and
      dbias = sum(dy) per channel; they are returned even for weight None (PyTorch has no
      such gradient for affine=False).
    """
    layout, n, c, s = _activation("dy", dy, layout)
    if not isinstance(x, np.ndarray):
        raise TypeError("x must be a numpy.ndarray, got %s" % type(x).__name__)
    _same_activation("x", x, "dy", dy, layout)
    weight = _vector("weight", weight, c)
    if training:
        save_mean = _vector("save_mean", save_mean, c, required=True)
        save_invstd = _vector("save_invstd", save_invstd, c, required=True)
        running_mean = _vector("running_mean", running_mean, c)
        running_var = _vector("running_var", running_var, c)
    else:
        running_mean = _vector("running_mean", running_mean, c, required=True)
        running_var = _vector("running_var", running_var, c, required=True)
        save_mean = _vector("save_mean", save_mean, c)
        save_invstd = _vector("save_invstd", save_invstd, c)
    dx = _output_like("out", out, dy, layout)
    dweight = np.empty(c, dtype=np.float32) if param_grads else None
    dbias = np.empty(c, dtype=np.float32) if param_grads else None
    _lib.check(_lib.lib().bnorm_backward_dt(
        _LAYOUT_CODE[layout], _ACTIVATION_DTYPES[x.dtype], n, c, s, _ptr(dy), _ptr(x), _ptr(weight),
        _ptr(save_mean), _ptr(save_invstd), _ptr(running_mean), _ptr(running_var),
        _eps(eps), 1 if training else 0, _ptr(dx), _ptr(dweight), _ptr(dbias)), x.shape)
    return dx, dweight, dbias
