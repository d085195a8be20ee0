"""SyncBatchNorm -> BatchNorm conversion for single-device training."""

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class BatchNormXd(_BatchNorm):
    """A batch norm that accepts 2D to 5D input, the single-device stand-in for SyncBatchNorm.

    ``torch.nn.SyncBatchNorm`` accepts any input rank, so the layer replacing it must
    too; the plain ``BatchNorm1d/2d/3d`` classes each check for one rank.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")


def _is_sync_batchnorm(module: nn.Module) -> bool:
    if isinstance(module, nn.SyncBatchNorm):
        return True
    # mmcv's SyncBatchNorm, recognised without importing mmcv (a heavy, optional package).
    cls = type(module)
    return cls.__name__ == "SyncBatchNorm" and cls.__module__.startswith("mmcv.")


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm in ``module`` (recursively) by :class:`BatchNormXd`.

    The new layers share the old ones' parameter and buffer tensors, and keep
    ``requires_grad`` and ``training``. Returns the converted root, which is a new object
    only when the root itself was a SyncBatchNorm.
    """
    converted = module
    if _is_sync_batchnorm(module):
        converted = BatchNormXd(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        new_child = revert_sync_batchnorm(child)
        if new_child is not child:
            converted.add_module(name, new_child)
        elif converted is not module:
            converted.add_module(name, child)
    return converted
