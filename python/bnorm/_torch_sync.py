"""bnorm.torch.SyncBatchNorm: synchronized batch norm on the CPU over a torch.distributed group.

    model = bnorm.torch.SyncBatchNorm.convert_sync_batchnorm(model)   # after init_process_group
    model = torch.nn.parallel.DistributedDataParallel(model)          # gloo, CPU

torch.nn.SyncBatchNorm refuses CPU tensors ("SyncBatchNorm expected input tensor to be on
GPU"); this module has its API (the constructor's arguments, ``process_group``,
``convert_sync_batchnorm``, the ``state_dict``) and computes CPU batch norm (float32, bfloat16,
float16) over the
global batch of the module's process group (default: the WORLD group) with libbnorm's
synchronized passes
(bnorm_sync_forward_train / bnorm_sync_backward): the library computes each rank's partials
and merges them, torch.distributed.all_reduce (SUM) exchanges them, called back from the
library on a tensor over the library's own buffer (no copy).

It subclasses torch.nn.modules.batchnorm._BatchNorm (what tools find batch norm by:
``isinstance(m, _BatchNorm)``, torch.optim.swa_utils.update_bn, ...), NOT torch.nn.SyncBatchNorm:
DistributedDataParallel refuses any torch.nn.SyncBatchNorm in a CPU module ("SyncBatchNorm
layers only work with GPU modules", torch 1.13 and later), which would make CPU data-parallel
training, the point of this module, impossible.

What it gives:
  * training: the statistics of the global batch (the ranks' local batches in rank order; an
    uneven split, or a rank with no samples, is weighted by its count); the running
    statistics and num_batches_tracked updated identically on every rank; the gradients dx of
    the global batch's loss; dweight and dbias the LOCAL batch's part, as torch's
    SyncBatchNorm gives them, so that DDP's gradient all-reduce trains as with torch's module.
  * sync_mode "reproducible" (the default): every output (y, dx, the running statistics, the
    global statistics) is bitwise the same for 1, 2, 3, ... processes holding the same global
    batch, and for any split of it. "per-rank": a smaller exchange (size x C x 2 doubles per
    pass instead of global batch x C x 2), within rounding of it.
  * one process (torch.distributed not initialized, or a group of size 1): the same
    algorithm without an exchange, so its results are bitwise those of K processes;
  * eval mode: no communication (the running statistics, or with track_running_stats=False
    the local batch's statistics, like torch).
  * errors: a rank whose input is bad makes every rank's call raise (bnorm.BnormError, naming
    the argument on that rank and the rank on the others); an exception in the all-reduce
    (a dead peer, gloo's timeout) is raised again from the module's forward/backward after the
    library returned; the module's buffers are then untouched.

Element types: float32, bfloat16 and float16 input (x, y, dx of the input's dtype; the
statistics exchanged in fp64 as for fp32); parameters and buffers of any of the three are
used as fp32, 16-bit running statistics written back rounded, and weight.grad / bias.grad
have the parameters' dtype.

What it does not compute: a non-CPU input goes to torch.nn.SyncBatchNorm's forward (CUDA),
a CPU input of another dtype (float64: the library does not support float64 tensors) to
torch's batch norm when nothing needs to be synchronized, each with a one-time
BnormFallbackWarning saying why; synchronizing a CPU input of another dtype raises TypeError
(torch has no CPU implementation to fall back to).
"""

import ctypes
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from . import _lib
# The package's memory-layout helpers and fallback warning (python/bnorm/torch.py).
from .torch import (_dtype_code, _dtype_reason, _empty, _fallback_warning, _grad_as,
                    _layout_of, _nsc, _ptr, _sync_threads, _to_layout, _vec, _writable,
                    _write_back, batch_norm)

__all__ = ["SyncBatchNorm", "SYNC_MODES"]

# bnorm_sync_mode of include/bnorm/c_api.h.
SYNC_MODES = {"reproducible": 0, "per-rank": 1}
_CHANNELS_FIRST = 0

_ALLREDUCE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _BnormComm(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("rank", ctypes.c_int), ("size", ctypes.c_int),
                ("allreduce_sum_f64", _ALLREDUCE_FN)]


class _BnormSyncOptions(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int), ("split", ctypes.POINTER(ctypes.c_int64)),
                ("split_out", ctypes.POINTER(ctypes.c_int64)),
                ("local_weight_grads", ctypes.c_int)]


_declared = set()
_declare_lock = threading.Lock()


def _cdll():
    """libbnorm's CDLL with the synchronized functions declared (once per library handle)."""
    lib = _lib.lib()
    if id(lib) in _declared:
        return lib
    with _declare_lock:
        i64, vp, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
        comm_p, opt_p = ctypes.POINTER(_BnormComm), ctypes.POINTER(_BnormSyncOptions)
        try:
            f, b = lib.bnorm_sync_forward_train_dt, lib.bnorm_sync_backward_dt
        except AttributeError:
            raise _lib.BnormLibraryNotFound(
                "%s has no bnorm_sync_forward_train_dt: a libbnorm.so older than the "
                "synchronized C API with element types; rebuild it" % _lib.library_path()) from None
        f.restype = ctypes.c_int
        f.argtypes = [comm_p, opt_p, ctypes.c_int, ctypes.c_int,   # comm, options, layout, dtype
                      i64, i64, i64,                               # n, c, s
                      vp, vp, vp,                                  # x, weight, bias
                      vp, vp, vp,                                  # running_*, num_batches_tracked
                      dbl, dbl,                                    # momentum, eps
                      vp, vp, vp]                                  # y, save_mean, save_invstd
        b.restype = ctypes.c_int
        b.argtypes = [comm_p, opt_p, ctypes.c_int, ctypes.c_int,   # comm, options, layout, dtype
                      i64, i64, i64,                               # n, c, s
                      vp, vp, vp,                                  # dy, x, weight
                      vp, vp,                                      # save_mean, save_invstd
                      vp, vp, vp]                                  # dx, dweight, dbias
        _declared.add(id(lib))
    return lib


class _Comm:
    """A bnorm_comm whose all-reduce is torch.distributed.all_reduce on `group` (None: no
    exchange, one rank). An exception inside the callback never reaches C: it is kept in
    .error, the callback returns 1, and raise_error() raises it after the library returned."""

    def __init__(self, group, rank, size):
        self.group = group
        self.error = None
        self._fn = _ALLREDUCE_FN(self._allreduce) if group is not None else _ALLREDUCE_FN()
        self.struct = _BnormComm(None, rank, size, self._fn)

    def _allreduce(self, _ctx, data, count):
        try:
            buf = (ctypes.c_double * count).from_address(data)
            t = torch.frombuffer(buf, dtype=torch.float64, count=count)  # the library's memory
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            return 0
        except BaseException as e:  # noqa: B902 -- also KeyboardInterrupt: nothing may cross C
            if self.error is None:
                self.error = e
            return 1

    def check(self, status):
        """Raise the callback's exception if there was one, else the library's error."""
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        _lib.check(status)


def _group_of(module):
    """(process group or None, rank, size) of the module's synchronization in training."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    group = module.process_group if module.process_group else dist.group.WORLD
    size = dist.get_world_size(group)
    if size <= 1:
        return None, 0, 1
    return group, dist.get_rank(group), size


def _i64_array(values):
    return (ctypes.c_int64 * len(values))(*values)


class _SyncFunction(torch.autograd.Function):
    """y = batch norm of x over the global batch of the group. saved_tensors[2:4] of the node
    are the global batch's mean and 1/sqrt(var + eps) (identical on every rank)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                eps, comm, mode):
        _sync_threads()
        layout = _layout_of(x)
        x_mem = x if layout is not None else x.contiguous()
        if layout is None:
            layout = _CHANNELS_FIRST
        n, c, s = _nsc(x_mem)
        dt = _dtype_code(x_mem)
        w, b = _vec(weight), _vec(bias)
        y = _empty(x_mem.shape, layout, x_mem.dtype)
        save_mean = torch.empty(c, dtype=torch.float32)
        save_invstd = torch.empty(c, dtype=torch.float32)
        size = comm.struct.size
        split = _i64_array([-1] * size)
        options = _BnormSyncOptions(mode, None, split, 0)
        data = (lambda t: _ptr(t) if n > 0 else None)
        # 16-bit running statistics: fp32 copies, written back (rounded) after success.
        rm_mem, rv_mem = _writable(running_mean), _writable(running_var)
        comm.check(_cdll().bnorm_sync_forward_train_dt(
            ctypes.byref(comm.struct), ctypes.byref(options), layout, dt, n, c, s, data(x_mem),
            _ptr(w), _ptr(b), _ptr(rm_mem), _ptr(rv_mem), _ptr(num_batches_tracked),
            momentum, eps, data(y), _ptr(save_mean), _ptr(save_invstd)))
        _write_back(running_mean, rm_mem)
        _write_back(running_var, rv_mem)
        ctx.save_for_backward(x_mem, weight, save_mean, save_invstd)
        ctx.split = list(split)
        ctx.layout, ctx.comm, ctx.mode = layout, comm, mode
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        _sync_threads()
        x_mem, weight, save_mean, save_invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        layout, comm = ctx.layout, ctx.comm
        dy = _to_layout(dy if dy.dtype == x_mem.dtype else dy.to(x_mem.dtype), layout)
        n, c, s = _nsc(x_mem)
        dt = _dtype_code(x_mem)
        dx = _empty(x_mem.shape, layout, x_mem.dtype)
        dweight = torch.empty(c, dtype=torch.float32) if need_w else None
        dbias = torch.empty(c, dtype=torch.float32) if need_b and ctx.has_bias else None
        options = _BnormSyncOptions(ctx.mode, _i64_array(ctx.split), None, 1)
        data = (lambda t: _ptr(t) if n > 0 else None)
        # Every rank takes part, whatever it needs: the exchange is collective.
        comm.check(_cdll().bnorm_sync_backward_dt(
            ctypes.byref(comm.struct), ctypes.byref(options), layout, dt, n, c, s, data(dy),
            data(x_mem), _ptr(_vec(weight)), _ptr(save_mean), _ptr(save_invstd), data(dx),
            _ptr(dweight), _ptr(dbias)))
        return (dx if need_x else None, _grad_as(dweight, weight),
                _grad_as(dbias, weight)) + (None,) * 7


def _unsupported(x, module):
    """Why the library cannot take this call (None: it can): device, then dtype."""
    tensors = [("input", x)] + [(k, v) for k, v in (
        ("weight", module.weight), ("bias", module.bias), ("running_mean", module.running_mean),
        ("running_var", module.running_var)) if v is not None]
    for name, t in tensors:
        if t.device.type != "cpu":
            return "device", "%s on device %s (the library runs on the CPU only)" % (name, t.device)
    for name, t in tensors:
        why = _dtype_reason(name, t.dtype)
        if why is not None:
            return "dtype", why
    if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
        return "type", "input of type %s (not a plain torch.Tensor)" % type(x).__name__
    if x.layout != torch.strided:
        return "type", "input layout %s (only strided tensors)" % x.layout
    if x.dim() > 5:
        return "type", "input of rank %d (the library takes rank 2..5)" % x.dim()
    return None


class SyncBatchNorm(_BatchNorm):
    """torch.nn.SyncBatchNorm's API whose CPU forward and backward are libbnorm's
    synchronized batch norm over ``process_group`` (default: torch.distributed's WORLD).

    Same constructor as torch's, plus ``sync_mode`` ("reproducible", the default, or
    "per-rank"; also an attribute). See the module docstring of bnorm._torch_sync (why it is
    not a subclass of torch.nn.SyncBatchNorm: DDP refuses those on the CPU).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None,
                 sync_mode="reproducible"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group
        if sync_mode not in SYNC_MODES:
            raise ValueError("sync_mode: must be one of %s, got %r" % (sorted(SYNC_MODES),
                                                                       sync_mode))
        self.sync_mode = sync_mode

    def extra_repr(self):
        return super().extra_repr() + ", sync_mode=%s" % self.sync_mode

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError("expected at least 2D input (got {}D input)".format(input.dim()))

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        need_sync = bn_training and self.training
        why = _unsupported(input, self)
        if why is not None:
            kind, reason = why
            if kind == "device":
                _fallback_warning(reason + " [SyncBatchNorm: torch.nn.SyncBatchNorm's forward]")
                return torch.nn.SyncBatchNorm.forward(self, input)
            if need_sync and _group_of(self)[0] is not None:
                raise TypeError("bnorm.torch.SyncBatchNorm: %s, and torch has no synchronized "
                                "batch norm on the CPU to fall back to" % reason)
        if not need_sync:
            # Eval (no communication): the library's batch norm, or torch's for what it cannot
            # take (its own one-time warning); a rank without samples has nothing to compute.
            running = (self.running_mean, self.running_var)
            if input.dim() >= 2 and input.shape[0] == 0:
                return F.batch_norm(input, running[0], running[1], self.weight, self.bias,
                                    bn_training, 0.0, self.eps)
            return batch_norm(input, running[0], running[1], self.weight, self.bias,
                              bn_training, 0.0 if self.momentum is None else self.momentum,
                              self.eps)
        if why is not None:  # one process, a dtype or type the library does not take
            _fallback_warning(why[1])
            return self._torch_batch_norm(input)
        if self.sync_mode not in SYNC_MODES:
            raise ValueError("sync_mode: must be one of %s, got %r" % (sorted(SYNC_MODES),
                                                                       self.sync_mode))
        track = self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        nbt = self.num_batches_tracked if track else None
        if track:
            for name, t in (("running_mean", running_mean), ("running_var", running_var)):
                if t is None or not t.is_contiguous():
                    raise ValueError("%s: must be a contiguous buffer (float32, bfloat16 or "
                                     "float16) to be updated in place, got %s"
                                     % (name, None if t is None else t.stride()))
            if nbt is None or nbt.dtype != torch.int64 or nbt.numel() != 1:
                raise ValueError("num_batches_tracked: must be one int64 value")
        c = int(input.shape[1])
        for name, t in (("weight", self.weight), ("bias", self.bias),
                        ("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.numel() != c:
                raise _lib.BnormError(1, "%s: must hold one value per channel, C = %d (x size "
                                      "%s), got %d" % (name, c, list(input.shape), t.numel()))
        momentum = -1.0 if self.momentum is None else float(self.momentum)
        group, rank, size = _group_of(self)
        comm = _Comm(group, rank, size)
        return _SyncFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                   nbt, momentum, float(self.eps), comm,
                                   SYNC_MODES[self.sync_mode])

    def _torch_batch_norm(self, input):
        """torch's batch norm on this process's batch, with the module's semantics."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None,
                            self.running_var if track else None, self.weight, self.bias, True,
                            factor, self.eps)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None, sync_mode="reproducible"):
        """Every batch norm layer of `module` (any torch.nn.modules.batchnorm._BatchNorm:
        torch's BatchNorm1d/2d/3d and SyncBatchNorm, bnorm's modules) replaced by this class,
        synchronized over `process_group` (None: the WORLD group), keeping the Parameter and
        buffer objects, the train/eval mode and qconfig; returns the module, or its replacement
        when `module` itself is one (torch's semantics)."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and \
                type(module) is not cls:
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, sync_mode=sync_mode)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group, sync_mode))
        return out

