"""Batch norm after training, for torch models: folding into the preceding layer, and precise
batch statistics.  Exported as ``bnorm.torch.fold_batch_norm`` and ``bnorm.torch.update_bn_stats``;
the C++ counterparts are ``bnorm::nn::fold_batch_norm`` and ``bnorm::nn::update_bn_stats``.

Both work on any ``torch.nn.modules.batchnorm._BatchNorm`` (torch's BatchNorm1d/2d/3d and
SyncBatchNorm, bnorm.torch's modules), in plain torch operations.
"""

import copy

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["fold_batch_norm", "update_bn_stats", "FoldError"]


class FoldError(ValueError):
    """A batch-norm layer that cannot be folded; the message names it and why."""


_CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_ABSORBS = (torch.nn.Linear,) + _CONV
# Which batch-norm class may follow which layer (None: bnorm.torch.BatchNorm, any rank).
_BN_FOR = {torch.nn.Linear: (torch.nn.BatchNorm1d,), torch.nn.Conv1d: (torch.nn.BatchNorm1d,),
           torch.nn.Conv2d: (torch.nn.BatchNorm2d,), torch.nn.Conv3d: (torch.nn.BatchNorm3d,)}


def _kind(m):
    return type(m).__name__


def _rank_free(bn):
    # bnorm.torch.BatchNorm and torch's SyncBatchNorm take any rank.
    return not isinstance(bn, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))


def _check_pair(layer, bn, layer_name, bn_name):
    where = "%s (%s)" % (bn_name, _kind(bn))
    if not isinstance(layer, _ABSORBS):
        raise FoldError("fold_batch_norm: %s follows %s (%s), not a Linear or Conv1d/2d/3d"
                        % (where, layer_name, _kind(layer)))
    base = next(t for t in _BN_FOR if type(layer) is t or isinstance(layer, t))
    if not _rank_free(bn) and not isinstance(bn, _BN_FOR[base]):
        raise FoldError("fold_batch_norm: %s follows a %s, which only a %s can fold into"
                        % (where, base.__name__, _BN_FOR[base][0].__name__))
    out = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
    if bn.num_features != out:
        raise FoldError("fold_batch_norm: %s has %d features after %s with %d outputs"
                        % (where, bn.num_features, layer_name, out))
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise FoldError("fold_batch_norm: %s keeps no running statistics "
                        "(track_running_stats=False): eval mode normalizes with the batch's"
                        % where)
    mean = bn.running_mean.detach().double()
    den = bn.running_var.detach().double() + bn.eps
    bad = ~(torch.isfinite(mean) & torch.isfinite(den) & (den > 0))
    if bn.affine:
        bad |= ~(torch.isfinite(bn.weight.detach().double()) & torch.isfinite(bn.bias.detach().double()))
    if bool(bad.any()):
        c = int(bad.nonzero()[0])
        raise FoldError("fold_batch_norm: %s channel %d cannot be folded (running_mean %r, "
                        "running_var %r): running_var + eps must be finite and > 0, the others "
                        "finite" % (where, c, float(mean[c]), float(bn.running_var[c])))


def _folded(layer, bn):
    """The layer with bn's eval-mode map folded in (fp64, rounded once to the layer's dtype)."""
    mean = bn.running_mean.detach().double()
    a = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shift = torch.zeros_like(mean)
    if bn.affine:
        a = a * bn.weight.detach().double()
        shift = bn.bias.detach().double()
    new = copy.deepcopy(layer)
    w = layer.weight.detach()
    shape = (-1,) + (1,) * (w.dim() - 1)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
    with torch.no_grad():
        new.weight.copy_((w.double() * a.view(shape)).to(w.dtype))
        bias = (a * (b - mean) + shift).to(w.dtype)
        if new.bias is None:
            new.bias = torch.nn.Parameter(bias.to(w.device))
        else:
            new.bias.copy_(bias)
    return new


def _parent(model, name):
    parts = name.split(".")
    parent = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
    return parent, parts[-1]


def fold_batch_norm(model, pairs=None, strict=True, inplace=False):
    """A model equal to ``model`` in eval mode with its batch-norm layers folded into the layer
    before each (Linear, Conv1d/2d/3d): ``W' = a W``, ``b' = a (b - running_mean) + bias_bn``
    with ``a = weight / sqrt(running_var + eps)``, computed in float64 and rounded once.  A layer
    without bias gains one.  Each folded batch norm is replaced by ``torch.nn.Identity`` (the
    other modules keep their names, as ``torch.ao.quantization.fuse_modules`` does), a fused
    BatchNormReLU1d/2d/3d by the ReLU it applied (bnorm.torch.FoldedReLU).

    pairs: None folds every batch norm that directly follows a Linear or Conv in an
    ``nn.Sequential``; or a list of ``(layer_name, bn_name)`` (names of ``named_modules()``),
    for models whose forward is not a Sequential (e.g. torchvision's ResNet: ``("conv1",
    "bn1")``) -- the caller vouches that bn directly follows layer in the forward.
    strict: with pairs=None, a batch norm left unfolded (after a nonlinearity or pooling, first
    in a Sequential, or outside any Sequential) raises FoldError naming it; False leaves it.
    inplace: fold into ``model`` itself (validated fully first) instead of a deep copy.
    Returns the folded model, in eval mode.  Raises FoldError, with ``model`` unchanged.
    """
    modules = dict(model.named_modules())
    todo = []  # (layer_name, bn_name)
    if pairs is not None:
        for layer_name, bn_name in pairs:
            for n in (layer_name, bn_name):
                if n not in modules:
                    raise FoldError("fold_batch_norm: pairs: no module named %r" % n)
            if not isinstance(modules[bn_name], _BatchNorm):
                raise FoldError("fold_batch_norm: pairs: %r is a %s, not a batch norm"
                                % (bn_name, _kind(modules[bn_name])))
            todo.append((layer_name, bn_name))
    else:
        for name, m in modules.items():
            if not isinstance(m, torch.nn.Sequential):
                continue
            children = list(m.named_children())
            for i, (child_name, child) in enumerate(children):
                if not isinstance(child, _BatchNorm):
                    continue
                full = name + "." + child_name if name else child_name
                if i == 0:
                    if strict:
                        raise FoldError("fold_batch_norm: %s (%s) is the first module of its "
                                        "Sequential: nothing before it to fold into"
                                        % (full, _kind(child)))
                    continue
                prev_name, prev = children[i - 1]
                prev_full = name + "." + prev_name if name else prev_name
                if not isinstance(prev, _ABSORBS) and not strict:
                    continue
                todo.append((prev_full, full))
    names = [bn for _, bn in todo]
    if len(set(names)) != len(names) or len({l for l, _ in todo}) != len(todo):
        raise FoldError("fold_batch_norm: pairs: a module appears in two pairs")
    for layer_name, bn_name in todo:
        _check_pair(modules[layer_name], modules[bn_name], layer_name, bn_name)
    if strict:
        left = [n for n, m in modules.items() if isinstance(m, _BatchNorm) and n not in names]
        if left:
            raise FoldError("fold_batch_norm: %s (%s) is not directly after a Linear or Conv in "
                            "an nn.Sequential: name its layer in pairs=[(layer, bn)], or pass "
                            "strict=False to leave it" % (left[0], _kind(modules[left[0]])))

    out = model if inplace else copy.deepcopy(model)
    for layer_name, bn_name in todo:
        layer = out.get_submodule(layer_name)
        bn = out.get_submodule(bn_name)
        new = _folded(layer, bn)
        parent, attr = _parent(out, layer_name)
        setattr(parent, attr, new)
        parent, attr = _parent(out, bn_name)
        # A fused batch norm + ReLU (bnorm.torch.BatchNormReLU2d, ...) leaves its ReLU.
        after = getattr(bn, "_after_fold", None)
        setattr(parent, attr, after() if after is not None else torch.nn.Identity())
    return out.eval()


def update_bn_stats(model, batches, num_batches, aggregation="mean", process_group=None):
    """Precise batch statistics (Wu & Johnson 2021; fvcore's update_bn_stats): replaces the
    running statistics of every batch-norm layer of ``model`` by an average over
    ``num_batches`` batches computed with the weights fixed.  The model runs in training mode
    (each layer normalizes with its batch statistics) under ``torch.no_grad()``; per layer and
    batch b, the batch mean m_b, unbiased variance u_b and count per channel n_b are taken, then
    aggregation="mean": running_mean = mean_b m_b, running_var = mean_b u_b (fvcore's);
    aggregation="population": the K batches as one population (pooled mean and unbiased
    variance: sum n_b m_b / sum n_b and (sum (n_b - 1) u_b + n_b (m_b - mean)^2) / (sum n_b - 1)).

    batches: an iterable of inputs, or of tuples/lists whose first item is the input (a
    DataLoader); it must yield at least num_batches of them.
    process_group: a torch.distributed group (or True for the default group): every rank passes
    its own batches and the sums are all-reduced in float64, so every rank ends with the same
    statistics (a SyncBatchNorm already sees the global batch: its sums count once).
    Everything else is restored: each module's mode, momentum, num_batches_tracked.  On an
    exception the model is unchanged.  Returns the number of samples used (over the ranks).
    """
    if aggregation not in ("mean", "population"):
        raise ValueError("update_bn_stats: aggregation: expected 'mean' or 'population', got %r"
                         % (aggregation,))
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError("update_bn_stats: num_batches: must be an int >= 1, got %r" % (num_batches,))
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not bns:
        raise ValueError("update_bn_stats: the model has no batch-norm layer")
    for n, m in bns:
        if not m.track_running_stats or m.running_mean is None:
            raise ValueError("update_bn_stats: %s (%s) keeps no running statistics "
                             "(track_running_stats=False)" % (n, _kind(m)))
    group = None
    if process_group is not None and process_group is not False:
        import torch.distributed as dist
        group = None if process_group is True else process_group
        world = dist.get_world_size(group)
        rank0 = dist.get_rank(group) == 0
    else:
        world, rank0 = 1, True

    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(),
              None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for _, m in bns]
    counts = {}

    def hook(m, inputs):
        x = inputs[0]
        counts[m] = x.numel() // x.shape[1]

    handles = [m.register_forward_pre_hook(hook) for _, m in bns]

    def restore():
        for m, on in modes:
            m.training = on
        for m, momentum, rm, rv, nbt in saved:
            m.momentum = momentum
            with torch.no_grad():
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)

    try:
        model.train()
        for _, m in bns:
            m.momentum = 1.0
        sums = [None] * len(bns)  # per layer: float64 [6, C]: shift, s0, s1, s2, mean_sum, var_sum
        samples, seen = 0, 0
        with torch.no_grad():
            for batch in batches:
                if seen == num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x)
                samples += int(x.shape[0])
                cnt = torch.tensor([float(counts[m]) for _, m in bns], dtype=torch.float64)
                is_sync = [isinstance(m, torch.nn.SyncBatchNorm) or
                           type(m).__name__ == "SyncBatchNorm" for _, m in bns]
                if world > 1 and any(is_sync):
                    import torch.distributed as dist
                    total = cnt.clone()
                    dist.all_reduce(total, group=group)
                    cnt = torch.where(torch.tensor(is_sync), total, cnt)
                for i, (_, m) in enumerate(bns):
                    mb = m.running_mean.detach().double()
                    ub = m.running_var.detach().double()
                    if sums[i] is None:
                        sums[i] = torch.zeros(6, mb.numel(), dtype=torch.float64)
                        sums[i][0] = mb
                    n = float(cnt[i])
                    d = mb - sums[i][0]
                    sums[i][1] += n
                    sums[i][2] += n * d
                    sums[i][3] += (n - 1) * ub + n * d * d
                    sums[i][4] += mb
                    sums[i][5] += ub
                seen += 1
        if seen < num_batches:
            raise ValueError("update_bn_stats: batches: gave %d batches, num_batches is %d"
                             % (seen, num_batches))
        nb = [float(num_batches)] * len(bns)
        if world > 1:
            import torch.distributed as dist
            # The shift must be the same on every rank: rank 0's first batch means. Re-centre
            # each rank's sums on it: s1 += s0 (p - p0), s2 += 2 (p - p0) s1 + s0 (p - p0)^2.
            shifts = torch.cat([s[0] for s in sums])
            p0 = shifts if rank0 else torch.zeros_like(shifts)
            dist.all_reduce(p0, group=group)
            at = 0
            flat = []
            for i, (_, m) in enumerate(bns):
                s = sums[i]
                c = s.shape[1]
                delta = s[0] - p0[at:at + c]
                at += c
                s2 = s[3] + 2 * delta * s[2] + s[1] * delta * delta
                s1 = s[2] + s[1] * delta
                s[0], s[2], s[3] = p0[at - c:at], s1, s2
                is_sync = isinstance(m, torch.nn.SyncBatchNorm) or type(m).__name__ == "SyncBatchNorm"
                contribute = rank0 or not is_sync
                flat.append(s[1:] if contribute else torch.zeros_like(s[1:]))
                if not is_sync:
                    nb[i] = float(num_batches * world)
            flat = torch.cat([f.reshape(-1) for f in flat])
            dist.all_reduce(flat, group=group)
            at = 0
            for s in sums:
                k = 5 * s.shape[1]
                s[1:] = flat[at:at + k].view(5, -1)
                at += k
            total = torch.tensor([float(samples)], dtype=torch.float64)
            dist.all_reduce(total, group=group)
            samples = int(total.item())
    except BaseException:
        for h in handles:
            h.remove()
        restore()
        raise
    for h in handles:
        h.remove()
    restore()
    with torch.no_grad():
        for i, (_, m) in enumerate(bns):
            s = sums[i]
            if aggregation == "mean":
                mean, var = s[4] / nb[i], s[5] / nb[i]
            else:
                mean = s[0] + s[2] / s[1]
                var = (s[3] - s[2] * s[2] / s[1]) / (s[1] - 1)
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
    return samples
