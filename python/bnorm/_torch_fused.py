"""Batch norm fused with the ReLU after it, for torch: ``y = relu(batch_norm(x) [+ residual])``
in one pass over the tensor, forward and backward (the C API's bnorm_forward_train_relu,
bnorm_forward_eval_relu, bnorm_backward_relu).  Exported as ``bnorm.torch.batch_norm_relu``,
``bnorm.torch.BatchNormReLU1d/2d/3d`` and ``bnorm.torch.convert(model, fuse_relu=True)``.

The backward keeps no mask: it reads the forward's output y (the mask is y > 0, torch's
threshold_backward on relu's result), so y must not be modified in place before the backward
(autograd's version check says so if it is).  What the library takes, the running-statistics
rules and the fallbacks are batch_norm's (bnorm.torch's docstring); a residual must have the
input's shape (no broadcasting) and dtype, any memory format (copied once into the input's
when they differ), and falls back with the input when its device or dtype is not the
library's (or not the input's).
"""

import torch
import torch.nn.functional as F

from . import _lib
from .torch import (_CHANNELS_FIRST, _EXTENSION_DEFAULTS, _TORCH_TO_BNORM, _carried_over,
                    _dtype_code, _fallback_warning, _grad_as, _layout_of, _library_arguments,
                    _module_arguments, _nsc, _ptr, _recomputed_grads, _resolve, _sync_threads,
                    _to_layout, _torch_batch_norm, _vec, _writable, _write_back)

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "FoldedReLU",
           "batch_norm_relu", "fuse_relu"]


class _ReLUFunction(torch.autograd.Function):
    """y = relu(batch_norm(x, weight, bias) [+ residual]) computed by libbnorm; the running
    statistics (training with tracking) are updated in place by the forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                use_batch_stats, momentum, eps):
        _sync_threads()
        layout = _layout_of(x)
        x_mem = x if layout is not None else x.contiguous()
        if layout is None:
            layout = _CHANNELS_FIRST
        z = None if residual is None else _to_layout(residual, layout)
        n, c, s = _nsc(x_mem)
        dt = _dtype_code(x_mem)
        w, b = _vec(weight), _vec(bias)
        y = torch.empty_like(x_mem)
        lib = _lib.lib()
        if use_batch_stats:
            stat_a = torch.empty(c, dtype=torch.float32)  # save_mean
            stat_b = torch.empty(c, dtype=torch.float32)  # save_invstd
            rm_mem, rv_mem = _writable(running_mean), _writable(running_var)
            _lib.check(lib.bnorm_forward_train_relu_dt(
                layout, dt, n, c, s, _ptr(x_mem), _ptr(w), _ptr(b), _ptr(rm_mem), _ptr(rv_mem),
                _ptr(num_batches_tracked), momentum, eps, _ptr(z), _ptr(y), _ptr(stat_a),
                _ptr(stat_b)), x.shape)
            _write_back(running_mean, rm_mem)
            _write_back(running_var, rv_mem)
        else:
            stat_a, stat_b = running_mean, running_var
            _lib.check(lib.bnorm_forward_eval_relu_dt(
                layout, dt, n, c, s, _ptr(x_mem), _ptr(w), _ptr(b), _ptr(_vec(stat_a)),
                _ptr(_vec(stat_b)), eps, _ptr(z), _ptr(y)), x.shape)
        ctx.save_for_backward(x, x_mem, y, weight, bias, residual, stat_a, stat_b)
        ctx.layout = layout
        ctx.use_batch_stats = use_batch_stats
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_mem, y, weight, bias, residual, stat_a, stat_b = ctx.saved_tensors
        need_x, need_w, need_b, need_z = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            _fallback_warning("double backward (create_graph=True) is not implemented by the "
                              "library")
            return _differentiable_backward(ctx, dy, x, weight, bias, residual, stat_a, stat_b)
        _sync_threads()
        layout = ctx.layout
        dy = _to_layout(dy.to(x_mem.dtype) if dy.dtype != x_mem.dtype else dy, layout)
        n, c, s = _nsc(x_mem)
        dt = _dtype_code(x_mem)
        dx = torch.empty_like(x_mem)  # required by the C API even when only dz is wanted
        want_params = need_w or need_b
        dweight = torch.empty(c, dtype=torch.float32) if want_params else None
        dbias = torch.empty(c, dtype=torch.float32) if want_params else None
        dz = torch.empty_like(x_mem) if need_z else None
        if ctx.use_batch_stats:
            save_mean, save_invstd, rm, rv, training = stat_a, stat_b, None, None, 1
        else:
            save_mean, save_invstd, rm, rv, training = None, None, _vec(stat_a), _vec(stat_b), 0
        _lib.check(_lib.lib().bnorm_backward_relu_dt(
            layout, dt, n, c, s, _ptr(dy), _ptr(x_mem), _ptr(y), _ptr(_vec(weight)),
            _ptr(save_mean), _ptr(save_invstd), _ptr(rm), _ptr(rv), ctx.eps, training, _ptr(dx),
            _ptr(dweight), _ptr(dbias), _ptr(dz)), x.shape)
        return (dx if need_x else None,
                _grad_as(dweight, weight) if need_w else None,
                _grad_as(dbias, bias) if need_b and bias is not None else None,
                dz,
                None, None, None, None, None, None)


def _composed(x, weight, bias, residual, running_mean, running_var, use_batch_stats, eps):
    """relu(batch_norm(x) [+ residual]) in torch ops, no running-statistics update."""
    if use_batch_stats:
        h = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    else:
        h = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    return torch.relu(h if residual is None else h + residual)


def _differentiable_backward(ctx, dy, x, weight, bias, residual, stat_a, stat_b):
    def compose(xs, w, b, zs):
        return _composed(xs, w, b, zs, stat_a, stat_b, ctx.use_batch_stats, ctx.eps)

    return tuple(_recomputed_grads(ctx.needs_input_grad[:4], (x, weight, bias, residual),
                                   compose, dy)) + (None,) * 6


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, residual=None, num_batches_tracked=None):
    """relu(batch_norm(input, ...) + residual) (residual None: relu(batch_norm(input, ...)))
    computed by the library in one pass, with autograd for input, weight, bias and residual.

    The arguments are bnorm.torch.batch_norm's (torch.nn.functional.batch_norm's, and
    num_batches_tracked: momentum None is the cumulative average, the counter is incremented in
    place); the running statistics are updated only when the call succeeds.  residual: a tensor
    of input's shape exactly.  Falls back to torch's composition (F.batch_norm, + residual,
    torch.relu; BnormFallbackWarning, once per reason) where batch_norm would, or when the
    residual is on another device, of another dtype or not a strided plain tensor."""
    more = ()
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError("residual: must be a torch.Tensor or None, got %s"
                            % type(residual).__name__)
        if residual.shape != input.shape:
            raise _lib.BnormError(1, "residual: must have the input's shape %s, got %s"
                                  % (list(input.shape), list(residual.shape)))
        more = (("residual", residual),)
    reason, momentum, nbt = _resolve(input, running_mean, running_var, weight, bias, training,
                                     momentum, num_batches_tracked, more)
    if reason is None and residual is not None:
        if type(residual) is not torch.Tensor and type(residual) is not torch.nn.Parameter:
            reason = "residual of type %s (not a plain torch.Tensor)" % type(residual).__name__
        elif residual.layout != torch.strided:
            reason = "residual layout %s (only strided tensors)" % residual.layout
    if reason is not None:
        _fallback_warning(reason)
        h = _torch_batch_norm(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, nbt)
        return torch.relu(h if residual is None else h + residual)
    running, mom = _library_arguments(input, running_mean, running_var, weight, bias, training,
                                      momentum, nbt)
    return _ReLUFunction.apply(input, weight, bias, residual, running[0], running[1], nbt,
                               bool(training), mom, float(eps))


# ----------------------------------------------------------------------------- modules

class _BnormReLUForward:
    """forward(input, residual=None) of torch's _BatchNorm followed by relu (after adding the
    residual), computed by the library.  The constructor, state_dict and load_state_dict are
    torch's class's.  fold_batch_norm replaces a folded one by FoldedReLU."""

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, momentum, nbt = _module_arguments(self)
        return batch_norm_relu(input, running_mean, running_var, self.weight, self.bias,
                               use_batch_stats, momentum, self.eps, residual=residual,
                               num_batches_tracked=nbt)

    def _after_fold(self):
        """What replaces this layer when fold_batch_norm folds it into the layer before."""
        return FoldedReLU()


class BatchNormReLU1d(_BnormReLUForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d then relu (forward(input, residual=None): relu(bn(input) +
    residual)), fused, computed by libbnorm: (N, C) or (N, C, L) input."""


class BatchNormReLU2d(_BnormReLUForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d then relu (forward(input, residual=None): relu(bn(input) +
    residual)), fused, computed by libbnorm: (N, C, H, W) input."""


class BatchNormReLU3d(_BnormReLUForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d then relu (forward(input, residual=None): relu(bn(input) +
    residual)), fused, computed by libbnorm: (N, C, D, H, W) input."""


class FoldedReLU(torch.nn.ReLU):
    """What a folded BatchNormReLU leaves: relu(input [+ residual]) (no state)."""

    def forward(self, input, residual=None):
        return F.relu(input if residual is None else input + residual, inplace=self.inplace)


# The fused class of each batch-norm class convert() fuses: torch's and bnorm's.
_FUSED = {torch.nn.BatchNorm1d: BatchNormReLU1d, torch.nn.BatchNorm2d: BatchNormReLU2d,
          torch.nn.BatchNorm3d: BatchNormReLU3d}
_FUSED.update({_TORCH_TO_BNORM[t]: fused for t, fused in list(_FUSED.items())})


def _hooked(m, tables):
    return any(getattr(m, t, None) for t in tables)


def _fusable(bn, relu, uses):
    cls = _FUSED.get(type(bn))
    if cls is None or type(relu) is not torch.nn.ReLU or uses[id(bn)] != 1:
        return None
    if type(bn) not in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
        if any(getattr(bn, k) != v for k, v in _EXTENSION_DEFAULTS.items()):
            return None  # bnorm's module with an extension on: not in the fused C entry points
    # A hook on the batch norm's output or gradient would see the ReLU's; one on the ReLU
    # would be lost.
    if _hooked(bn, ("_forward_hooks", "_backward_hooks")):
        return None
    if _hooked(relu, ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")):
        return None
    return cls


def fuse_relu(model):
    """convert(model, fuse_relu=True)'s fusion, in place (returns model): in every
    torch.nn.Sequential (the exact class: a subclass may have its own forward), a
    torch.nn.BatchNorm1d/2d/3d (or bnorm's, with no extension on) directly followed by a
    torch.nn.ReLU (inplace or not) becomes BatchNormReLU1d/2d/3d, holding the batch norm's
    Parameter and buffer objects, hooks and mode, and the ReLU torch.nn.Identity: the
    state_dict keys are unchanged, so checkpoints load either way.

    Left unfused: a ReLU called from a forward() (torchvision's BasicBlock and Bottleneck call
    self.relu, and add the residual, in their forward: nothing of ResNet's blocks is fused, nor
    its stem, which is conv1/bn1/relu attributes, not a Sequential), F.relu / torch.relu, other
    activations, SyncBatchNorm, a batch norm used at more than one place of the model, and a
    pair where the batch norm has forward or backward hooks or the ReLU any hook.  The caller
    vouches that the Sequential's batch norm is not also called on its own elsewhere (through
    an attribute path to it): there it would now apply the ReLU too."""
    uses = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for seq in list(model.modules()):
        if type(seq) is not torch.nn.Sequential:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            bn, relu = seq._modules[first], seq._modules[second]
            cls = _fusable(bn, relu, uses)
            if cls is None:
                continue
            seq._modules[first] = _carried_over(bn, cls(bn.num_features, bn.eps, bn.momentum,
                                                        bn.affine, bn.track_running_stats))
            seq._modules[second] = torch.nn.Identity()
    return model
