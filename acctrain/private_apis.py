"""Every private API of another library that acctrain uses, and nothing else: one place to check on an upgrade.

The rule: acctrain touches another library's private names (a `_name` attribute, method, function, module or
dict key of torch, Accelerate, torchmetrics, HF datasets or TensorBoard) and its internals (TensorBoard's record
writer) only here, through the functions below; no other module of acctrain does. tests/test_private_apis.py
scans every module of acctrain (subpackages too) and fails on a use elsewhere.

Checked against torch 2.13.0, accelerate 1.16.0, torchmetrics 1.9.0, datasets 5.2.0, tensorboard 2.21.0.

To check an upgrade of one of them: read this file's section for that library against its new source, then run
tests/test_private_apis.py (the scan, and each function once against the installed libraries) and the tests
that depend on each function's behaviour (found by tracing the calls in a test run; node ids under tests/):

    tensor_version
        test_checkpoint.py::test_async_snapshot_leaves_stable_tensors_to_the_writer_and_refuses_a_torn_copy
        test_checkpoint.py::test_weights_changed_outside_the_engine_during_an_async_copy_fail_that_save
    foreach_lerp_
        test_ema.py::test_the_average_is_the_one_computed_by_hand_and_skips_skipped_steps (and test_ema.py)
    foreach_mul_
        test_hf_datasets.py::test_token_weighted_steps_are_the_same_for_every_micro_batch_size_and_process_count
        test_loss_fn.py
        test_engine_fsdp.py::test_fsdp_gradients_match_full_batch (DTensor gradients)
    uncompiled
        test_export.py::test_a_compiled_model_exports_plain_names
        test_speed_options.py::test_compile_trains_like_eager_and_checkpoints_keep_plain_names
    uncompiled_name, COMPILE_WRAPPER
        test_export.py::test_a_compiled_model_exports_plain_names
        test_engine_fsdp.py::test_export_joins_the_shards
    BATCH_NORM
        test_toolkit.py::test_bn_freeze_keeps_frozen_running_statistics
    dump_flight_recorder
        test_watchdog.py::test_a_stalled_rank_is_named_and_the_job_ends (the recorder's entries)
    accelerate_cached_precision, reset_accelerate_state
        test_precision.py::test_bf16_trains_on_cpu_with_fp32_master_weights (bf16, then fp32, in one process)
        test_resume_checks.py::test_settings_that_change_on_resume_are_each_printed_with_what_they_do
    set_accelerate_fsdp_state
        test_fsdp.py, test_engine_fsdp.py
        test_ema.py::test_under_fsdp_the_average_is_sharded_saved_whole_and_resumed_on_one_process
        test_metrics.py::test_ranks_with_fewer_eval_batches_keep_in_step
    metric_states, set_metric_sync, set_metric_update_count
        test_metrics.py::test_torchmetrics_with_summed_states_ride_the_one_all_reduce
        test_metrics.py::test_metrics_and_predict_on_two_processes_equal_the_hand_made_reference
    hf_fingerprint
        test_resume_checks.py::test_a_hugging_face_dataset_is_identified_by_its_fingerprint
    tensorboard_record_crc, tensorboard_reference_crc, set_tensorboard_record_crc
        test_tracking.py::test_event_files_carry_tensorboards_own_checksums

Each function is the private use and nothing more: the logic around it stays with its caller, and a function
that a new version breaks is fixed here, for every caller at once.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# ------------------------------------------------------------------------------------------------ torch


def tensor_version(tensor: torch.Tensor) -> int:
    """`Tensor._version`, the in-place change counter (torch 2.13.0): an async save sees a tensor changed while it copies."""
    return tensor._version


def foreach_lerp_(tensors: list[torch.Tensor], ends: list[torch.Tensor], weight: float) -> None:
    """`torch._foreach_lerp_` (torch 2.13.0): the EMA updates all its averages in one kernel per group of tensors."""
    torch._foreach_lerp_(tensors, ends, weight)


def foreach_mul_(tensors: list[torch.Tensor], scalar: torch.Tensor) -> None:
    """`torch._foreach_mul_` (torch 2.13.0): a token-weighted step scales its gradients by an on-device factor, no sync."""
    torch._foreach_mul_(tensors, scalar)


COMPILE_WRAPPER = "_orig_mod"
"""torch.compile's `OptimizedModule._orig_mod` (torch 2.13.0): the attribute holding the compiled module, and the
name part it adds to state-dict keys; export records and names the model without it."""


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module in torch.compile's wrappers, their `_orig_mod` (torch 2.13.0): export records the model's own class."""
    while hasattr(model, COMPILE_WRAPPER):  # torch.compile's wrapper
        model = getattr(model, COMPILE_WRAPPER)
    return model


def uncompiled_name(name: str) -> str:
    """A state-dict key less torch.compile's `_orig_mod` parts (torch 2.13.0): exported tensors have plain names."""
    return ".".join(part for part in name.split(".") if part != COMPILE_WRAPPER)


BATCH_NORM: type = torch.nn.modules.batchnorm._BatchNorm
"""`torch.nn.modules.batchnorm._BatchNorm` (torch 2.13.0), the base of BatchNorm1d/2d/3d and SyncBatchNorm:
BnFreeze finds every BatchNorm layer by it."""


def dump_flight_recorder() -> bytes | str:
    """`torch._C._distributed_c10d._dump_fr_trace_json` (torch 2.13.0, none public): the flight recorder in a hang report."""
    from torch._C._distributed_c10d import _dump_fr_trace_json

    return _dump_fr_trace_json(True, True)


# ------------------------------------------------------------------------------------------- Accelerate


def accelerate_cached_precision(default: str) -> str:
    """`AcceleratorState._shared_state["_mixed_precision"]` or `default` (accelerate 1.16.0): the precision cached in-process."""
    from accelerate.state import AcceleratorState

    return AcceleratorState._shared_state.get("_mixed_precision", default)


def reset_accelerate_state() -> None:
    """`AcceleratorState._reset_state()` (accelerate 1.16.0; keeps PartialState): a later Engine may choose another precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def set_accelerate_fsdp_state(accelerator: Any, fsdp_plugin: Any) -> None:
    """Sets `state.distributed_type`, `state.fsdp_plugin`, `PartialState._shared_state` (accelerate 1.16.0): FSDP2 on CPU, where Accelerate drops the plugin."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = fsdp_plugin
    # Every later `AcceleratorState()` copies PartialState's fields over its own (as Accelerate itself does
    # on GPUs, state.py `PartialState._shared_state["distributed_type"] = ...`): keep them in agreement.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


# ------------------------------------------------------------------------------------------ torchmetrics


def metric_states(metric: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A torchmetrics metric's `_defaults`, `_reductions` (torchmetrics 1.9.0): states that are sums ride the eval's all-reduce."""
    return metric._defaults, metric._reductions


def set_metric_sync(metric: Any, sync: bool) -> None:
    """Sets a metric's `_to_sync`, which `compute` reads (torchmetrics 1.9.0): acctrain all-reduces summed states itself."""
    metric._to_sync = sync


def set_metric_update_count(metric: Any, count: int) -> None:
    """Sets a metric's `_update_count` (torchmetrics 1.9.0): states set from totals stand for updates (else `compute` warns)."""
    metric._update_count = count


# ------------------------------------------------------------------------------------------- HF datasets


def hf_fingerprint(dataset: Any) -> str | None:
    """A `datasets.Dataset`'s `_fingerprint`, else None (datasets 5.2.0): identifies the data; a resume onto other is refused."""
    return getattr(dataset, "_fingerprint", None)


# -------------------------------------------------------------------------------------------- TensorBoard


def tensorboard_record_crc() -> Callable[[bytes], int] | None:
    """The internal `record_writer.masked_crc32c`, else None (tensorboard 2.21.0): the checksum TensorBoard's writer uses now."""
    from tensorboard.summary.writer import record_writer

    return getattr(record_writer, "masked_crc32c", None)


def tensorboard_reference_crc(data: bytes) -> int:
    """The internal `pywrap_tensorflow.masked_crc32c(data)` (tensorboard 2.21.0): a faster replacement is checked against it."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    return pywrap_tensorflow.masked_crc32c(data)


def set_tensorboard_record_crc(crc: Callable[[bytes], int]) -> None:
    """Replaces the internal `record_writer.masked_crc32c` (tensorboard 2.21.0): event files are checksummed by C CRC-32C."""
    from tensorboard.summary.writer import record_writer

    record_writer.masked_crc32c = crc
