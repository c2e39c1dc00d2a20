"""Gradient norms per parameter group and clipping by global norm.

The norm of a group is the norm of its per-tensor norms, and the total the norm of
the group norms, so one set of fused ``torch._foreach_norm`` calls yields both the
per-group figures (vision / projector / language) and the global one. An exploding
group is the first visible sign of the NaN and rising-loss failures, so the groups
are measured even when only the global norm is clipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from vlm_dpo_plugins.types import GradNorms, ParameterGroups

# torch.nn.utils.clip_grad_norm_ adds the same epsilon, so both clip to the same coefficient.
_EPSILON = 1e-6

ParametersByGroup = Mapping[str, Sequence[torch.nn.Parameter]]


def parameters_by_group(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], groups: ParameterGroups
) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable parameters sorted into the freeze policy's groups; names it did not classify go to ``other``."""
    group_of = {name: group for group, names in groups.items() for name in names}
    sorted_parameters: dict[str, list[torch.nn.Parameter]] = {}
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            sorted_parameters.setdefault(group_of.get(name, "other"), []).append(parameter)
    return sorted_parameters


def _gradients(parameters: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [parameter.grad for parameter in parameters if parameter.grad is not None]


def _norm_of_tensors(tensors: Sequence[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """The ``norm_type`` norm of all elements of ``tensors`` together, accumulated in fp32."""
    by_device_and_dtype: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device_and_dtype.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    per_tensor: list[torch.Tensor] = []
    for bucket in by_device_and_dtype.values():
        # dtype=float32: bf16 gradients are summed and returned in fp32, so a large norm does not lose its digits.
        per_tensor.extend(norm.to(device) for norm in torch._foreach_norm(bucket, norm_type, dtype=torch.float32))
    return torch.linalg.vector_norm(torch.stack(per_tensor), norm_type)


def measure_grad_norms(parameters: ParametersByGroup, norm_type: float = 2.0) -> GradNorms | None:
    """Pre-clip gradient norms, total and per group (groups without gradients are left out); None without gradients."""
    gradients = {group: grads for group, params in parameters.items() if (grads := _gradients(params))}
    if not gradients:
        return None
    device = next(iter(gradients.values()))[0].device
    group_norms = [_norm_of_tensors(grads, norm_type, device) for grads in gradients.values()]
    total = torch.linalg.vector_norm(torch.stack(group_norms), norm_type)
    # One device-to-host copy for all the numbers: the skip decision needs them on the host anyway.
    values = torch.stack([total, *group_norms]).tolist()
    return GradNorms(total=values[0], groups=dict(zip(gradients, values[1:])))


def _scale(gradients: list[torch.Tensor], coefficient: float) -> None:
    if coefficient < 1.0:
        torch._foreach_mul_(gradients, coefficient)


def clip_coefficient(norm: float, max_norm: float) -> float:
    return min(1.0, max_norm / (norm + _EPSILON))


def clip_grad_norms(
    parameters: ParametersByGroup,
    max_norm: float | None,
    group_max_norms: Mapping[str, float] | None = None,
    norm_type: float = 2.0,
) -> GradNorms | None:
    """Clip each group listed in ``group_max_norms`` to its own norm, then everything to ``max_norm``.

    Returns the norms measured before any clipping. Non-finite norms leave the
    gradients untouched: scaling by NaN would spread it to every parameter, and the
    step is about to be skipped anyway.
    """
    norms = measure_grad_norms(parameters, norm_type)
    if norms is None or not math.isfinite(norms.total):
        return norms
    group_max_norms = group_max_norms or {}
    clipped_group_norms = {}
    for group, norm in norms.groups.items():
        coefficient = clip_coefficient(norm, group_max_norms[group]) if group in group_max_norms else 1.0
        _scale(_gradients(parameters[group]), coefficient)
        clipped_group_norms[group] = norm * coefficient
    if max_norm is not None:
        total = norms.total
        if clipped_group_norms != norms.groups:
            total = float(torch.linalg.vector_norm(torch.tensor(list(clipped_group_norms.values())), norm_type))
        everything = [grad for params in parameters.values() for grad in _gradients(params)]
        _scale(everything, clip_coefficient(total, max_norm))
    return norms
