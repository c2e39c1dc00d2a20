"""Gradient norms per parameter group and clipping by global norm.

The norm of a group is the norm of its per-tensor norms, and the total the norm of
all per-tensor norms, so one set of fused ``torch._foreach_norm`` calls yields both the
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


class GroupedParameters(dict):
    """Parameters by group that also remember the model's order.

    With it the total norm is taken over the per-tensor norms in model order, as
    ``torch.nn.utils.clip_grad_norm_`` takes it, so clipping gives bit-identical
    gradients: in fp32 a different summation order changes the last bit, and Adam
    amplifies that for gradients near zero until runs visibly drift apart.
    """

    model_order: list[torch.nn.Parameter]


def parameters_by_group(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], groups: ParameterGroups
) -> GroupedParameters:
    """The trainable parameters sorted into the freeze policy's groups; names it did not classify go to ``other``."""
    group_of = {name: group for group, names in groups.items() for name in names}
    sorted_parameters = GroupedParameters()
    sorted_parameters.model_order = []
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            sorted_parameters.setdefault(group_of.get(name, "other"), []).append(parameter)
            sorted_parameters.model_order.append(parameter)
    return sorted_parameters


def _gradients(parameters: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [parameter.grad for parameter in parameters if parameter.grad is not None]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2's sharded gradients), the tensor itself otherwise: the fused kernels
    take plain tensors, and scaling the local part in place scales the DTensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _per_tensor_norms(tensors: Sequence[torch.Tensor], norm_type: float, device: torch.device) -> list[torch.Tensor]:
    """Each tensor's norm, in input order, accumulated in fp32, from one fused call per device and dtype; a sharded
    DTensor's norm is over all its shards (one collective for all of them), never this rank's part alone."""
    local = [_local(tensor) for tensor in tensors]
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(local):
        buckets.setdefault((tensor.device, tensor.dtype), []).append(index)
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    for indices in buckets.values():
        # dtype=float32: bf16 gradients are summed and returned in fp32, so a large norm does not lose its digits.
        bucket_norms = torch._foreach_norm([local[i] for i in indices], norm_type, dtype=torch.float32)
        for index, norm in zip(indices, bucket_norms):
            norms[index] = norm.to(device)
    sharded = [index for index, tensor in enumerate(tensors) if local[index] is not tensor]
    if sharded:
        _combine_shards(norms, sharded, tensors, norm_type)
    return norms  # type: ignore[return-value]


def _combine_shards(
    norms: list[torch.Tensor | None], sharded: list[int], tensors: Sequence[torch.Tensor], norm_type: float
) -> None:
    """Local norms of sharded DTensors made whole: summed as p-th powers (max for inf) over the ranks holding them."""
    import torch.distributed as dist

    groups = {}
    for index in sharded:
        mesh, placements = tensors[index].device_mesh, tensors[index].placements
        if mesh.ndim != 1 or not all(placement.is_shard() for placement in placements):
            raise NotImplementedError(
                f"vlm-dpo: gradient norms of DTensors placed {placements} on a {mesh.ndim}-D mesh are not supported "
                "(FSDP2's 1-D sharding is); turn the guards' clipping off (guards.max_grad_norm: null) for this run"
            )
        groups.setdefault(id(mesh.get_group()), (mesh.get_group(), []))[1].append(index)
    for group, indices in groups.values():
        stacked = torch.stack([norms[index] for index in indices])  # type: ignore[misc]
        if math.isinf(norm_type):
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=group)
        else:
            stacked = stacked**norm_type
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
            stacked = stacked ** (1.0 / norm_type)
        for position, index in enumerate(indices):
            norms[index] = stacked[position]


def _measure(parameters: ParametersByGroup, norm_type: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    gradients = {group: grads for group, params in parameters.items() if (grads := _gradients(params))}
    if not gradients:
        return None
    device = next(iter(gradients.values()))[0].device
    model_order = getattr(parameters, "model_order", None)
    ordered = _gradients(model_order) if model_order is not None else [g for gs in gradients.values() for g in gs]
    norms = _per_tensor_norms(ordered, norm_type, device)
    norm_of = {id(grad): norm for grad, norm in zip(ordered, norms)}
    group_norms = {
        group: torch.linalg.vector_norm(torch.stack([norm_of[id(g)] for g in grads]), norm_type)
        for group, grads in gradients.items()
    }
    return torch.linalg.vector_norm(torch.stack(norms), norm_type), group_norms


def measure_grad_norms(parameters: ParametersByGroup, norm_type: float = 2.0) -> GradNorms | None:
    """Pre-clip gradient norms, total and per group (groups without gradients are left out); None without gradients."""
    measured = _measure(parameters, norm_type)
    if measured is None:
        return None
    total, group_norms = measured
    # One device-to-host copy for all the numbers: the skip decision needs them on the host anyway.
    values = torch.stack([total, *group_norms.values()]).tolist()
    return GradNorms(total=values[0], groups=dict(zip(group_norms, values[1:])))


def _scale(gradients: list[torch.Tensor], coefficient: float) -> None:
    if coefficient < 1.0:
        torch._foreach_mul_([_local(gradient) for gradient in gradients], coefficient)


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
    measured = _measure(parameters, norm_type)
    if measured is None:
        return None
    total_tensor, group_tensors = measured
    values = torch.stack([total_tensor, *group_tensors.values()]).tolist()
    norms = GradNorms(total=values[0], groups=dict(zip(group_tensors, values[1:])))
    if not math.isfinite(norms.total):
        return norms
    group_max_norms = group_max_norms or {}
    clipped_group_norms = {}
    for group, norm in norms.groups.items():
        coefficient = clip_coefficient(norm, group_max_norms[group]) if group in group_max_norms else 1.0
        _scale(_gradients(parameters[group]), coefficient)
        clipped_group_norms[group] = norm * coefficient
    if max_norm is not None:
        everything = [grad for params in parameters.values() for grad in _gradients(params)]
        if clipped_group_norms != norms.groups:
            total = float(torch.linalg.vector_norm(torch.tensor(list(clipped_group_norms.values())), norm_type))
            _scale(everything, clip_coefficient(total, max_norm))
        else:
            # As torch.nn.utils.clip_grad_norm_ computes it, in the gradients' dtype, so the result is identical.
            coefficient = torch.clamp(max_norm / (total_tensor + _EPSILON), max=1.0)
            if coefficient.item() < 1.0:
                torch._foreach_mul_([_local(gradient) for gradient in everything], coefficient)
    return norms


def norm_after_clipping(
    norms: GradNorms, max_norm: float | None, group_max_norms: Mapping[str, float] | None = None, norm_type: float = 2.0
) -> float:
    """The total norm :func:`clip_grad_norms` leaves: groups clipped to their own norms first, then the total."""
    group_max_norms = group_max_norms or {}
    if not group_max_norms or not norms.groups:
        total = norms.total
    else:
        clipped = [
            norm * clip_coefficient(norm, group_max_norms[g]) if g in group_max_norms else norm
            for g, norm in norms.groups.items()
        ]
        total = sum(norm**norm_type for norm in clipped) ** (1 / norm_type)
    return total if max_norm is None or not math.isfinite(total) else min(total, max_norm)
