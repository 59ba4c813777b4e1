"""bnorm.torch: drop-in batch norm modules for PyTorch, computed by libbnorm.so.

    import bnorm.torch
    model = bnorm.torch.convert(model)      # every torch.nn.BatchNorm1d/2d/3d, in place

BatchNorm1d, BatchNorm2d and BatchNorm3d subclass torch's classes of the same name (so they are
also ``torch.nn.modules.batchnorm._BatchNorm``: ``isinstance`` checks, ``_check_input_dim``,
the constructor, ``state_dict`` keys and ``_version`` handling are torch's own) and only
replace ``forward``.  ``BatchNorm`` takes any rank >= 2: it is what ``convert`` makes of a
``torch.nn.SyncBatchNorm`` when no process group is initialized (with one, bnorm's
``SyncBatchNorm``).

What the library computes: float32, bfloat16 and float16 CPU tensors, contiguous or
channels_last/channels_last_3d (and, for (N, C, L), ``x.transpose(1, 2).contiguous()
.transpose(1, 2)``) are passed by pointer, with no copy; the output has the input's strides;
other strides are made contiguous
once.  Train and eval mode, momentum=None (cumulative average), affine=False,
track_running_stats=False (batch statistics in eval too, like torch).  The running statistics
and num_batches_tracked are updated in place on the module's buffers, also under
torch.no_grad(), and only when the call succeeds: a failing call (e.g. a wrong channel count,
whose message is the library's, raised as bnorm.BnormError, a RuntimeError; a per-channel
vector of the wrong length is found before the call and reported in the library's words)
leaves the module untouched.  Training with one value per channel raises torch's ValueError.

bfloat16 and float16 input: x, y and the gradients are passed as 16-bit tensors (y, dx and a
residual's gradient have the input's dtype, like torch), the statistics are those of the same
values in fp32 (accumulated as for fp32 input) and every 16-bit output is rounded once.  The
per-channel vectors (weight, bias, running statistics) are fp32 in the library: a module whose
parameters and buffers are bfloat16 or float16 (``model.to(torch.bfloat16)``) has them
converted to fp32 for the call, and its running statistics are written back rounded to their
dtype, and weight.grad / bias.grad have the parameters' dtype, as torch gives them.  (torch
1.13 has no float16 batch norm on the CPU; bnorm.torch computes it.)

What falls back to torch's own implementation, with a one-time warning (BnormFallbackWarning)
naming the reason: a non-CPU tensor, a float64 input or parameter (the library does not
support float64 tensors) or another dtype than float32, bfloat16 and float16, an empty batch,
an input that is not a plain torch.Tensor, and double backward (create_graph=True: the
gradient is then computed by torch's batch norm, so that it is differentiable again).

Fused with the ReLU after it (bnorm/_torch_fused.py): batch_norm_relu, BatchNormReLU1d/2d/3d
(relu(bn(x) [+ residual]) in one pass, forward and backward), convert(model, fuse_relu=True).
"""

import ctypes
import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import _lib

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BnormFallbackWarning",
           "convert", "batch_norm"]

_CHANNELS_FIRST, _CHANNELS_LAST = 0, 1

# The element types of the library's tensors (bnorm_dtype of include/bnorm/c_api.h); the
# per-channel vectors of these dtypes are converted to float32 for a call.
_DTYPE_CODES = {torch.float32: _lib.FLOAT32, torch.bfloat16: _lib.BFLOAT16,
                torch.float16: _lib.FLOAT16}


def _dtype_code(t):
    return _DTYPE_CODES[t.dtype]


def _dtype_reason(name, dtype):
    """Why a tensor of this dtype is not the library's (None: it is)."""
    if dtype in _DTYPE_CODES:
        return None
    d = str(dtype).replace("torch.", "")
    if dtype == torch.float64:
        return "%s has dtype float64 (the library does not support float64 tensors; it takes " \
               "float32, bfloat16 and float16)" % name
    return "%s has dtype %s (the library takes float32, bfloat16 and float16 only)" % (name, d)


class BnormFallbackWarning(UserWarning):
    """bnorm handed a call to torch's own batch norm (the message says why); given once per
    reason."""


_warned = set()
_warned_lock = threading.Lock()


def _fallback_warning(reason):
    with _warned_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn("bnorm.torch: %s; using torch's own batch norm for it (this warning is "
                  "given once)" % reason, BnormFallbackWarning, stacklevel=4)


def _reset_fallback_warnings():
    """Forget which fallback warnings were given (for tests)."""
    with _warned_lock:
        _warned.clear()


# ----------------------------------------------------------------------------- memory layout

def _dense_strides(sizes, order):
    """Strides of a dense tensor of `sizes` whose dims lie in memory in `order` (outermost
    first)."""
    strides = [0] * len(sizes)
    acc = 1
    for d in reversed(order):
        strides[d] = acc
        acc *= sizes[d]
    return strides


def _matches(t, strides):
    # The stride of a dim of extent 1 is irrelevant (torch's own contiguity rule).
    return all(sz == 1 or st == want for sz, st, want in zip(t.shape, t.stride(), strides))


def _order(ndim, layout):
    if layout == _CHANNELS_FIRST:
        return list(range(ndim))
    return [0] + list(range(2, ndim)) + [1]


def _layout_of(t):
    """_CHANNELS_FIRST or _CHANNELS_LAST when t's memory is one of them (first wins when both
    describe the same memory), else None."""
    # Fast path (the hot one): torch's cached contiguity flags, the same rule as _matches
    # except for an empty tensor (torch calls it contiguous in every format).
    if t.numel():
        if t.is_contiguous():
            return _CHANNELS_FIRST
        if _is_channels_last(t):
            return _CHANNELS_LAST
    for layout in (_CHANNELS_FIRST, _CHANNELS_LAST):
        if _matches(t, _dense_strides(t.shape, _order(t.dim(), layout))):
            return layout
    return None


def _is_channels_last(t):
    ndim = t.dim()
    return ((ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)) or
            (ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))


def _to_layout(t, layout):
    """t itself if its memory is in `layout`, else one dense copy in it."""
    if t.numel() and (t.is_contiguous() if layout == _CHANNELS_FIRST else _is_channels_last(t)):
        return t
    if _matches(t, _dense_strides(t.shape, _order(t.dim(), layout))):
        return t
    out = _empty(t.shape, layout)
    out.copy_(t)
    return out


def _empty(shape, layout, dtype=torch.float32):
    return torch.empty_strided(tuple(shape), _dense_strides(shape, _order(len(shape), layout)),
                               dtype=dtype)


def _vec(t):
    """A per-channel read-only vector: contiguous float32 (detached; a copy only if strided or
    of a 16-bit dtype)."""
    if t is None:
        return None
    if t.dtype != torch.float32:
        return t.detach().to(torch.float32).contiguous()
    return t if t.is_contiguous() else t.detach().contiguous()


def _grad_as(g, t):
    """A per-channel gradient (float32) in the dtype of the parameter t it is for."""
    return g if g is None or t is None or g.dtype == t.dtype else g.to(t.dtype)


def _ptr(t):
    return None if t is None else t.data_ptr()


def _writable(t):
    """A running-statistics buffer the library writes in place: t itself, or (strided, never a
    module's own buffer, or bfloat16/float16) a contiguous float32 copy that _write_back copies
    into t (rounding to its dtype) after success."""
    if t is None:
        return t
    if t.dtype != torch.float32:
        return t.detach().to(torch.float32).contiguous()
    return t if t.is_contiguous() else t.contiguous()


def _write_back(t, mem):
    if t is not None and mem is not t:
        t.copy_(mem)


def _nsc(x):
    n, c = int(x.shape[0]), int(x.shape[1])
    s = 1
    for d in x.shape[2:]:
        s *= int(d)
    return n, c, s


# ----------------------------------------------------------------------------- threads

_threads = {"count": 0, "openmp": None}


def _sync_threads():
    """The library's kernels follow torch: as many threads as torch.get_num_threads() (unless
    BNORM_NUM_THREADS is set). With BNORM_OPENMP_THREADS=1 they run on torch's own OpenMP
    threads, whose idle members otherwise spin on the cores bnorm's own workers need; off by
    default (docs/benchmarks.md: which is faster depends on how loaded the machine is)."""
    if _threads["openmp"] is None:
        on = os.environ.get("BNORM_OPENMP_THREADS", "0") == "1"
        _threads["openmp"] = bool(_lib.lib().bnorm_use_openmp_threads(1 if on else 0))
    if "BNORM_NUM_THREADS" in os.environ:
        return
    n = torch.get_num_threads()
    if n != _threads["count"]:
        _lib.lib().bnorm_set_num_threads(n)
        _threads["count"] = n


def threads_info():
    """(thread count, whether the kernels run on torch's OpenMP threads) as bnorm.torch set them."""
    _sync_threads()
    return _lib.lib().bnorm_num_threads(), _threads["openmp"]


# ----------------------------------------------------------------------------- autograd

class _Function(torch.autograd.Function):
    """y = batch_norm(x, weight, bias) computed by libbnorm; the running statistics (training
    with tracking) are updated in place by the forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                use_batch_stats, momentum, eps, ext=None):
        _sync_threads()
        layout = _layout_of(x)
        x_mem = x if layout is not None else x.contiguous()
        if layout is None:
            layout = _CHANNELS_FIRST
        n, c, s = _nsc(x_mem)
        dt = _dtype_code(x_mem)
        w, b = _vec(weight), _vec(bias)
        y = torch.empty_like(x_mem)  # x_mem is dense: its strides, faster than _empty
        lib = _lib.lib()
        if use_batch_stats:
            save_mean = torch.empty(c, dtype=torch.float32)
            save_invstd = torch.empty(c, dtype=torch.float32)
            rm, rv = running_mean, running_var
            rm_mem, rv_mem = _writable(rm), _writable(rv)
            nbt = num_batches_tracked
            if ext is None:
                _lib.check(lib.bnorm_forward_train_dt(
                    layout, dt, n, c, s, _ptr(x_mem), _ptr(w), _ptr(b), _ptr(rm_mem), _ptr(rv_mem),
                    _ptr(nbt), momentum, eps, _ptr(y), _ptr(save_mean), _ptr(save_invstd)),
                    x.shape)
                save_r = save_d = None
            else:
                save_mean, save_invstd, save_r, save_d = _forward_ext(
                    ext, layout, dt, n, c, s, x_mem, w, b, rm_mem, rv_mem, nbt, momentum, eps, y)
            _write_back(rm, rm_mem)
            _write_back(rv, rv_mem)
            if save_r is not None:
                save_invstd = torch.stack([save_invstd, save_r, save_d])
            ctx.save_for_backward(x, x_mem, weight, bias, save_mean, save_invstd)
        else:
            rm, rv = _vec(running_mean), _vec(running_var)
            _lib.check(lib.bnorm_forward_eval_dt(
                layout, dt, n, c, s, _ptr(x_mem), _ptr(w), _ptr(b), _ptr(rm), _ptr(rv), eps,
                _ptr(y)), x.shape)
            ctx.save_for_backward(x, x_mem, weight, bias, running_mean, running_var)
        ctx.layout = layout
        ctx.use_batch_stats = use_batch_stats
        ctx.eps = eps
        ctx.ext = ext
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_mem, weight, bias, stat_a, stat_b = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must itself be differentiable; torch's batch
            # norm recomputes it (no running-statistics update: the forward did that).
            _fallback_warning("double backward (create_graph=True) is not implemented by the "
                              "library")
            return _differentiable_backward(ctx, dy, x, weight, bias, stat_a, stat_b)
        _sync_threads()
        layout = ctx.layout
        dy = _to_layout(dy.to(x_mem.dtype) if dy.dtype != x_mem.dtype else dy, layout)
        n, c, s = _nsc(x_mem)
        dt = _dtype_code(x_mem)
        dx = torch.empty_like(x_mem)  # x_mem is dense: its strides
        want_params = need_w or need_b
        dweight = torch.empty(c, dtype=torch.float32) if want_params else None
        dbias = torch.empty(c, dtype=torch.float32) if want_params else None
        w = _vec(weight)
        if ctx.use_batch_stats:
            save_mean, save_invstd, rm, rv, training = stat_a, stat_b, None, None, 1
        else:
            save_mean, save_invstd, rm, rv, training = None, None, _vec(stat_a), _vec(stat_b), 0
        bext = None
        if ctx.ext is not None:
            bext = _lib.BackwardExtensions()
            bext.ghost_batch = ctx.ext.ghost_batch
            if ctx.ext.batch_renorm:
                save_invstd, r, d = stat_b[0], stat_b[1], stat_b[2]
                bext.renorm_r, bext.renorm_d = _ptr(r), _ptr(d)
        args = (layout, dt, n, c, s, _ptr(dy), _ptr(x_mem), _ptr(w), _ptr(save_mean),
                _ptr(save_invstd), _ptr(rm), _ptr(rv), ctx.eps, training, _ptr(dx),
                _ptr(dweight), _ptr(dbias))
        if bext is None:
            _lib.check(_lib.lib().bnorm_backward_dt(*args), x.shape)
        else:
            _lib.check(_lib.lib().bnorm_backward_ext_dt(*args, ctypes.byref(bext)), x.shape)
        return (dx if need_x else None,
                _grad_as(dweight, weight) if need_w else None,
                _grad_as(dbias, bias) if need_b and bias is not None else None,
                None, None, None, None, None, None, None)


def _forward_ext(ext, layout, dt, n, c, s, x_mem, w, b, rm, rv, nbt, momentum, eps, y):
    """The training forward with the extensions (ghost chunks, batch renorm, stateless
    outputs): returns save_mean, save_invstd, save_r, save_d."""
    chunks = -(-n // ext.ghost_batch) if 2 <= ext.ghost_batch <= n else 1
    save_mean = torch.empty(chunks * c, dtype=torch.float32)
    save_invstd = torch.empty(chunks * c, dtype=torch.float32)
    save_r = save_d = None
    e = _lib.TrainExtensions()
    e.ghost_batch = ext.ghost_batch
    if ext.batch_renorm:
        save_r = torch.empty(c, dtype=torch.float32)
        save_d = torch.empty(c, dtype=torch.float32)
        e.batch_renorm, e.rmax, e.dmax = 1, ext.rmax, ext.dmax
        e.save_r, e.save_d = _ptr(save_r), _ptr(save_d)
    if ext.running_out is not None:
        e.running_mean_out = _ptr(ext.running_out[0])
        e.running_var_out = _ptr(ext.running_out[1])
        e.num_batches_tracked_out = _ptr(ext.running_out[2])
    _lib.check(_lib.lib().bnorm_forward_train_ext_dt(
        layout, dt, n, c, s, _ptr(x_mem), _ptr(w), _ptr(b), _ptr(rm), _ptr(rv), _ptr(nbt), momentum,
        eps, _ptr(y), _ptr(save_mean), _ptr(save_invstd), ctypes.byref(e)), x_mem.shape)
    return save_mean, save_invstd, save_r, save_d


class _Ext:
    """The extensions of one training call (None of it: PyTorch's batch norm)."""
    __slots__ = ("ghost_batch", "batch_renorm", "rmax", "dmax", "running_out")

    def __init__(self, ghost_batch=0, batch_renorm=False, rmax=3.0, dmax=5.0, running_out=None):
        self.ghost_batch = int(ghost_batch)
        self.batch_renorm = bool(batch_renorm)
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.running_out = running_out


def _differentiable_backward(ctx, dy, x, weight, bias, stat_a, stat_b):
    def compose(xs, weight, bias):
        if ctx.use_batch_stats and ctx.ext is not None and (ctx.ext.ghost_batch or
                                                            ctx.ext.batch_renorm):
            rd = (stat_b[1], stat_b[2]) if ctx.ext.batch_renorm else None
            return _torch_composed(xs, weight, bias, ctx.eps, ctx.ext.ghost_batch, rd)
        if ctx.use_batch_stats:
            return F.batch_norm(xs, None, None, weight, bias, True, 0.0, ctx.eps)
        return F.batch_norm(xs, stat_a, stat_b, weight, bias, False, 0.0, ctx.eps)

    return tuple(_recomputed_grads(ctx.needs_input_grad[:3], (x, weight, bias), compose,
                                   dy)) + (None,) * 7


def _recomputed_grads(need, tensors, compose, dy):
    """Double backward: the gradients (create_graph=True) of compose(*tensors), torch ops
    recomputing a forward, for the tensors marked in need (None for the others)."""
    with torch.enable_grad():
        ts = [t if t is None or t.requires_grad or not nd else t.detach().requires_grad_()
              for t, nd in zip(tensors, need)]
        y = compose(*ts)
        inputs = [t for t, nd in zip(ts, need) if nd and t is not None]
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return [next(grads) if nd and t is not None else None for t, nd in zip(ts, need)]


def _renorm_constants(x, running_mean, running_var, eps, rmax, dmax):
    """Batch renorm's r and d (no gradient), from x's batch statistics and mu = running_mean,
    sigma = sqrt(running_var + eps)."""
    with torch.no_grad():
        dims = [0] + list(range(2, x.dim()))
        xd = x.detach().double()
        mean = xd.mean(dims)
        sigma_b = (xd.var(dims, unbiased=False) + eps).sqrt()
        sigma = (running_var.double() + eps).sqrt()
        r = (sigma_b / sigma).clamp(1.0 / rmax, rmax)
        d = ((mean - running_mean.double()) / sigma).clamp(-dmax, dmax)
    return r.float(), d.float()


def _torch_composed(x, weight, bias, eps, ghost_batch, renorm_rd):
    """The extensions' training output in torch ops (no running-statistics update): ghost
    batch norm as torch's batch norm on contiguous chunks, batch renorm as
    weight * (xhat * r + d) + bias with r, d constants.  For the fallback and double backward."""
    if ghost_batch:
        return torch.cat([F.batch_norm(chunk, None, None, weight, bias, True, 0.0, eps)
                          for chunk in torch.split(x, ghost_batch)])
    r, d = renorm_rd
    shape = [1, -1] + [1] * (x.dim() - 2)
    xhat = F.batch_norm(x, None, None, None, None, True, 0.0, eps)
    y = xhat * r.view(shape) + d.view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def _fallback_reason(x, tensors):
    if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
        return "input of type %s (not a plain torch.Tensor)" % type(x).__name__
    if x.layout != torch.strided:
        return "input layout %s (only strided tensors)" % x.layout
    for name, t in (("input", x),) + tuple(tensors):
        if t is None:
            continue
        if not t.is_cpu:
            return "%s on device %s (the library runs on the CPU only)" % (name, t.device)
    for name, t in (("input", x),) + tuple(tensors):
        if name != "num_batches_tracked" and t is not None:
            why = _dtype_reason(name, t.dtype)
            if why is not None:
                return why
            if name == "residual" and t.dtype != x.dtype:
                return "residual has dtype %s, the input %s (the library takes one dtype for " \
                       "both)" % (str(t.dtype).replace("torch.", ""),
                                  str(x.dtype).replace("torch.", ""))
    if x.dim() < 2:
        return "input of rank %d (batch norm needs (N, C, ...))" % x.dim()
    if x.numel() == 0:
        return "empty input of shape %s" % (tuple(x.shape),)
    return None


def _verify_batch_size(size):
    """torch's check (torch.nn.functional._verify_batch_size), with its message."""
    prod = size[0]
    for d in size[2:]:
        prod *= d
    if prod == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         "{}".format(size))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, num_batches_tracked=None, *, ghost_batch=0,
               batch_renorm=False, rmax=3.0, dmax=5.0, running_mean_out=None,
               running_var_out=None, num_batches_tracked_out=None):
    """torch.nn.functional.batch_norm computed by the library (same arguments; momentum None
    with num_batches_tracked: the cumulative average, num_batches_tracked incremented in
    place, as the modules do).  Falls back to torch's F.batch_norm as the module docstring
    says.

    Extensions (training only; the defaults are torch's batch norm; README "Beyond PyTorch's
    batch norm"): ghost_batch=G normalizes each chunk of G consecutive samples with its own
    statistics (one running-statistics update per chunk, in order); batch_renorm=True is
    batch renormalization with r clipped to [1/rmax, rmax] and d to [-dmax, dmax] (needs the
    running statistics); running_mean_out / running_var_out (and num_batches_tracked_out)
    receive the updated running statistics, and running_mean / running_var /
    num_batches_tracked are then only read (a stateless update, for functional transforms)."""
    ext = None
    if ghost_batch or batch_renorm or running_mean_out is not None or running_var_out is not None:
        if not training:
            raise ValueError("ghost_batch, batch_renorm and running_*_out are for training")
        if (running_mean_out is None) != (running_var_out is None):
            raise _lib.BnormError(1, "running_mean_out and running_var_out: give both "
                                  "(stateless update) or neither")
        if running_mean_out is not None and running_mean is None:
            raise _lib.BnormError(1, "running_mean_out: a stateless update needs the running "
                                  "statistics it starts from (running_mean, running_var), got "
                                  "none")
        if batch_renorm and running_mean is None:
            raise _lib.BnormError(1, "batch_renorm: requires running_mean and running_var (mu "
                                  "and sigma^2), got none")
        out = None
        if running_mean_out is not None:
            for name, t in (("running_mean_out", running_mean_out),
                            ("running_var_out", running_var_out)):
                if (t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu or
                        t.numel() != int(input.shape[1])):
                    raise _lib.BnormError(1, "%s: must be a contiguous float32 CPU tensor of C = "
                                          "%d values" % (name, int(input.shape[1])))
            if num_batches_tracked_out is not None and num_batches_tracked_out.dtype != torch.int64:
                raise _lib.BnormError(1, "num_batches_tracked_out: must be int64")
            out = (running_mean_out, running_var_out, num_batches_tracked_out)
        ext = _Ext(ghost_batch, batch_renorm, rmax, dmax, out)
    reason, momentum, nbt = _resolve(input, running_mean, running_var, weight, bias, training,
                                     momentum, num_batches_tracked)
    if reason is not None and ext is not None:
        _fallback_warning(reason)
        return _extended_fallback(input, running_mean, running_var, weight, bias, momentum, eps,
                                  nbt, ext)
    if reason is not None:
        _fallback_warning(reason)
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, nbt)
    running, mom = _library_arguments(input, running_mean, running_var, weight, bias, training,
                                      momentum, nbt)
    return _Function.apply(input, weight, bias, running[0], running[1], nbt, bool(training),
                           mom, float(eps), ext)


def _resolve(input, running_mean, running_var, weight, bias, training, momentum,
             num_batches_tracked, more=()):
    """What batch_norm and batch_norm_relu decide first: (reason, momentum, nbt), reason the
    fallback's (None: the library runs), nbt the counter to increment (None: no tracking).
    more: further (name, tensor) pairs the library must take (the residual)."""
    if momentum is None and num_batches_tracked is None:
        momentum = 0.0  # what torch's module passes when it has no counter
    track = training and running_mean is not None
    nbt = num_batches_tracked if track else None
    reason = _fallback_reason(input, (("weight", weight), ("bias", bias),
                                      ("running_mean", running_mean),
                                      ("running_var", running_var),
                                      ("num_batches_tracked", nbt)) + tuple(more))
    if reason is None and nbt is not None and (nbt.dtype != torch.int64 or nbt.numel() != 1):
        reason = "num_batches_tracked of dtype %s and shape %s (int64, one element)" % (
            nbt.dtype, tuple(nbt.shape))
    return reason, momentum, nbt


def _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      nbt):
    """torch's F.batch_norm, with the counter incremented as the modules do (the fallback)."""
    if nbt is not None:
        nbt.add_(1)
        if momentum is None:
            momentum = 1.0 / float(nbt)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training,
                        0.0 if momentum is None else momentum, eps)


def _library_arguments(input, running_mean, running_var, weight, bias, training, momentum, nbt):
    """Checks made before a library call (torch's errors where torch has one, else the
    library's words), nothing written: returns ((running_mean, running_var) to pass, the C
    API's momentum)."""
    if training:
        _verify_batch_size(input.size())  # torch's ValueError, before any state changes
    track = training and running_mean is not None
    if track and (running_var is None):
        raise ValueError("running_mean given without running_var")
    if not track:
        running = (None, None) if training else (running_mean, running_var)
    else:
        running = (running_mean, running_var)
    if not training and (running[0] is None or running[1] is None):
        raise ValueError("eval-mode batch_norm needs running_mean and running_var")
    c = int(input.shape[1])
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running[0]),
                    ("running_var", running[1])):
        if t is not None and t.numel() != c:
            # The C API takes C from the caller and cannot see a vector's length: checked
            # here, in the library's words.
            raise _lib.BnormError(1, "%s: must hold one value per channel, C = %d (x size %s), "
                                  "got %d" % (name, c, list(input.shape), t.numel()))
    return running, -1.0 if momentum is None else float(momentum)


def _extended_fallback(input, running_mean, running_var, weight, bias, momentum, eps, nbt, ext):
    """The extensions in torch ops, for inputs the library does not take (another device or
    dtype): the same conventions (contiguous chunks, one update per chunk, r and d from the
    statistics before the update, stateless outputs)."""
    if 2 > ext.ghost_batch != 0:
        raise _lib.BnormError(1, "ghost_batch: must be 0 (off) or >= 2, got %d" % ext.ghost_batch)
    if ext.batch_renorm and (not ext.rmax >= 1 or not ext.dmax >= 0):
        raise _lib.BnormError(1, "rmax: must be >= 1 and dmax >= 0, got %r, %r" % (ext.rmax,
                                                                                   ext.dmax))
    rm, rv, count = running_mean, running_var, nbt
    if ext.running_out is not None and rm is not None:
        rm, rv = running_mean.clone(), running_var.clone()
        count = None if nbt is None else nbt.clone()
    rd = None
    if ext.batch_renorm:
        rd = _renorm_constants(input, rm, rv, eps, ext.rmax, ext.dmax)
    chunks = torch.split(input, ext.ghost_batch) if ext.ghost_batch else (input,)
    if rm is not None:
        with torch.no_grad():
            for chunk in chunks:
                f = momentum
                if count is not None:
                    count.add_(1)
                    if momentum is None:
                        f = 1.0 / float(count)
                F.batch_norm(chunk.detach(), rm, rv, None, None, True,
                             0.0 if f is None else f, eps)
    if ext.running_out is not None and rm is not None:
        ext.running_out[0].copy_(rm)
        ext.running_out[1].copy_(rv)
        if ext.running_out[2] is not None and count is not None:
            ext.running_out[2].copy_(count)
    return _torch_composed(input, weight, bias, eps, ext.ghost_batch, rd)


# ----------------------------------------------------------------------------- modules

_EXTENSION_DEFAULTS = {"normalize_with_running_stats": False, "freeze_running_stats": False,
                       "freeze_affine": False, "batch_renorm": False, "rmax": 3.0, "dmax": 5.0,
                       "ghost_batch": 0}


class _BnormForward:
    """forward() of torch's _BatchNorm (1.13 and later), computed by the library, with the
    extensions as keyword-only constructor arguments and attributes (class-level defaults are
    torch's behaviour, so a module made by convert() has them too):

      normalize_with_running_stats  training normalizes with the running statistics (as they
                                    were before the step; constants in the backward)
      freeze_running_stats          training leaves running_mean/var, num_batches_tracked alone
      freeze_affine                 weight and bias get no gradient (their .grad stays as is)
      batch_renorm, rmax, dmax      batch renormalization (rmax/dmax may change every step)
      ghost_batch                   statistics per chunk of G consecutive samples in training

    All three freeze switches together are torchvision's FrozenBatchNorm2d.  Eval mode is
    torch's whatever the switches say.
    """

    normalize_with_running_stats = False
    freeze_running_stats = False
    freeze_affine = False
    batch_renorm = False
    rmax = 3.0
    dmax = 5.0
    ghost_batch = 0

    def __init__(self, *args, **kwargs):
        ext = {k: kwargs.pop(k) for k in list(kwargs) if k in _EXTENSION_DEFAULTS}
        super().__init__(*args, **kwargs)
        for k, v in ext.items():
            setattr(self, k, v)
        self._check_extensions()

    def _check_extensions(self):
        """The library's rules for the switches, checked before a forward writes anything."""
        if self.normalize_with_running_stats and not self.track_running_stats:
            raise _lib.BnormError(1, "normalize_with_running_stats: a frozen-statistics layer "
                                  "needs running statistics, but track_running_stats is false")
        if self.batch_renorm:
            if not self.track_running_stats:
                raise _lib.BnormError(1, "batch_renorm: needs running statistics (mu and sigma), "
                                      "but track_running_stats is false")
            if self.normalize_with_running_stats:
                raise _lib.BnormError(1, "batch_renorm: cannot be combined with "
                                      "normalize_with_running_stats")
            if self.ghost_batch:
                raise _lib.BnormError(1, "batch_renorm: cannot be combined with ghost_batch = %d"
                                      % self.ghost_batch)
        if not float(self.rmax) >= 1:
            raise _lib.BnormError(1, "rmax: must be >= 1 (1: no rescaling), got %r" % self.rmax)
        if not float(self.dmax) >= 0:
            raise _lib.BnormError(1, "dmax: must be >= 0 (0: no shift), got %r" % self.dmax)
        if self.ghost_batch != 0 and self.ghost_batch < 2:
            raise _lib.BnormError(1, "ghost_batch: must be 0 (off) or >= 2, got %d"
                                  % self.ghost_batch)

    def extra_repr(self):
        out = super().extra_repr()
        for k, default in _EXTENSION_DEFAULTS.items():
            v = getattr(self, k)
            if v != default and (k not in ("rmax", "dmax") or self.batch_renorm):
                out += ", %s=%s" % (k, v)
        return out

    def forward(self, input):
        self._check_input_dim(input)
        self._check_extensions()
        training = self.training
        weight, bias = self.weight, self.bias
        if self.freeze_affine and weight is not None:
            weight, bias = weight.detach(), bias.detach()
        if training and self.normalize_with_running_stats:
            # Normalized with the statistics as they are (copies: the update below writes the
            # buffers, and the backward needs the values used), then updated from the batch.
            y = batch_norm(input, self.running_mean.detach().clone(),
                           self.running_var.detach().clone(), weight, bias, False, 0.0, self.eps)
            if not self.freeze_running_stats:
                momentum = self.momentum
                with torch.no_grad():
                    batch_norm(input.detach(), self.running_mean, self.running_var, None, None,
                               True, momentum, self.eps,
                               num_batches_tracked=self.num_batches_tracked)
            return y
        running_mean, running_var, use_batch_stats, momentum, nbt = _module_arguments(
            self, self.freeze_running_stats)
        track = training and self.track_running_stats and not self.freeze_running_stats
        ext = {}
        if training and (self.ghost_batch or self.batch_renorm):
            ext = {"ghost_batch": self.ghost_batch, "batch_renorm": self.batch_renorm,
                   "rmax": float(self.rmax), "dmax": float(self.dmax)}
            if self.batch_renorm and not track:  # mu and sigma read, not updated
                running_mean, running_var = self.running_mean, self.running_var
                ext["running_mean_out"] = torch.empty_like(running_mean, dtype=torch.float32)
                ext["running_var_out"] = torch.empty_like(running_var, dtype=torch.float32)
        return batch_norm(input, running_mean, running_var, weight, bias,
                          use_batch_stats, momentum, self.eps, num_batches_tracked=nbt, **ext)


def _module_arguments(m, freeze_running_stats=False):
    """The functional call of torch's _BatchNorm.forward for module m in its mode:
    (running_mean, running_var, use_batch_stats, momentum, num_batches_tracked to increment)."""
    training = m.training
    track = training and m.track_running_stats and not freeze_running_stats
    use_batch_stats = training or (m.running_mean is None and m.running_var is None)
    running_mean = m.running_mean if not training or track else None
    running_var = m.running_var if not training or track else None
    nbt = m.num_batches_tracked if track else None
    momentum = m.momentum
    if momentum is None and nbt is None:
        momentum = 0.0  # torch: exponential_average_factor 0 without a counter
    return running_mean, running_var, use_batch_stats, momentum, nbt


class BatchNorm1d(_BnormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by libbnorm: (N, C) or (N, C, L) input."""


class BatchNorm2d(_BnormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by libbnorm: (N, C, H, W) input."""


class BatchNorm3d(_BnormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by libbnorm: (N, C, D, H, W) input."""


class BatchNorm(_BnormForward, _BatchNorm):
    """Batch norm of any input rank >= 2 ((N, C), (N, C, L), (N, C, H, W), ...), computed by
    libbnorm: what convert() makes of a torch.nn.SyncBatchNorm when torch.distributed has no
    process group.  (Ranks above 5 have no channels-last format: they are made contiguous.)"""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError("expected at least 2D input (got {}D input)".format(input.dim()))


_TORCH_TO_BNORM = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _sync_batchnorm_class():
    from ._torch_sync import SyncBatchNorm as cls
    return cls


def _replacement(m):
    """The bnorm module for m (None: leave m), holding m's Parameter and buffer objects."""
    cls = _TORCH_TO_BNORM.get(type(m))
    kwargs = {}
    if cls is None and type(m) is torch.nn.SyncBatchNorm:
        on_cpu = all(t.device.type == "cpu" for t in list(m.parameters(recurse=False)) +
                     list(m.buffers(recurse=False)))
        if not on_cpu:
            return None  # a CUDA SyncBatchNorm works as it is
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            cls = _sync_batchnorm_class()
            kwargs["process_group"] = m.process_group
        else:
            cls = BatchNorm
    if cls is None:
        return None
    return _carried_over(m, cls(m.num_features, m.eps, m.momentum, m.affine,
                                m.track_running_stats, **kwargs))


def _carried_over(m, new):
    """new (a module of another batch-norm class) with everything of m's: the Parameter and
    buffer objects themselves (optimizers and references stay valid), the training flag, the
    hooks (whatever hook tables this torch version has), qconfig and user attributes; only what
    the new class adds (none for the classes here) is the new module's own."""
    for k, v in m.__dict__.items():
        if k in ("_parameters", "_buffers", "_modules"):
            v = type(v)(v)
        new.__dict__[k] = v
    return new


def convert(module, fuse_relu=False):
    """Replace every torch.nn.BatchNorm1d/2d/3d in `module` (and every torch.nn.SyncBatchNorm
    on the CPU) by bnorm's module, in place; returns the module, or its replacement when
    `module` itself is one (like torch.nn.SyncBatchNorm.convert_sync_batchnorm).

    fuse_relu=True also fuses each batch norm directly followed by a torch.nn.ReLU in an
    nn.Sequential: the pair becomes BatchNormReLU1d/2d/3d and torch.nn.Identity (same
    state_dict keys); bnorm/_torch_fused.py (fuse_relu) says what is fused and what is not.

    The replacement keeps the same Parameter and buffer objects (an optimizer built before
    still trains it), the train/eval mode, requires_grad, hooks and other attributes.  Only
    torch's exact classes are replaced: a subclass may define its own forward and is left as
    it is, and so are bnorm's modules.  A SyncBatchNorm becomes bnorm's SyncBatchNorm (same
    process_group) when torch.distributed is initialized, else the rank-agnostic BatchNorm.
    A module used at several places of the model is replaced by one module everywhere.
    """
    memo = {}

    def visit(m):
        key = id(m)
        if key in memo:
            return memo[key]
        new = _replacement(m)
        out = m if new is None else new
        memo[key] = out
        for name, child in list(out._modules.items()):
            if child is not None:
                c2 = visit(child)
                if c2 is not child:
                    out._modules[name] = c2
        return out

    out = visit(module)
    return _fuse_relu(out) if fuse_relu else out


# After training: folding into the layer before, precise statistics (bnorm/_torch_inference.py).
from ._torch_inference import FoldError, fold_batch_norm, update_bn_stats  # noqa: E402

__all__ += ["FoldError", "fold_batch_norm", "update_bn_stats"]

# Fused batch norm + ReLU (and + residual add): bnorm/_torch_fused.py.
from ._torch_fused import (BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d,  # noqa: E402
                           FoldedReLU, batch_norm_relu, fuse_relu as _fuse_relu)

__all__ += ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "FoldedReLU",
            "batch_norm_relu"]


def __getattr__(name):
    # bnorm.torch.SyncBatchNorm lives in bnorm/_torch_sync.py, imported on first use.
    if name == "SyncBatchNorm":
        return _sync_batchnorm_class()
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
