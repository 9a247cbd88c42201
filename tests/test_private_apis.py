"""Other libraries' private APIs: acctrain uses them only in acctrain/private_apis.py (a scan of every module of acctrain),
and each function there works with the installed torch, Accelerate, torchmetrics, datasets and TensorBoard.

After an upgrade of one of them, run this file and the tests private_apis' docstring names per function."""

from __future__ import annotations

import ast
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import acctrain
from acctrain import private_apis

PACKAGE = Path(acctrain.__file__).parent
HOME = "private_apis.py"

INTERNAL_MODULES = ("tensorboard.summary.writer.record_writer", "tensorboard.compat.tensorflow_stub")
"""Modules of other libraries that are internal without an underscore in their names (private_apis uses them)."""

def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _third_party(module: str) -> bool:
    top = module.split(".")[0]
    return bool(top) and top != "acctrain" and top not in sys.stdlib_module_names


def _home_names() -> set[str]:
    """The private names private_apis.py uses: attributes, string constants (getattr, dict keys) and imports."""
    tree = ast.parse((PACKAGE / HOME).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
        elif isinstance(node, ast.ImportFrom):
            names.update((node.module or "").split(".") + [alias.name for alias in node.names])
    return {name for name in names if _private(name) and name.isidentifier()}


KNOWN = _home_names()


def _root(node: ast.AST) -> ast.AST:
    """The name an attribute chain starts from: `torch` in `torch.nn.modules._X`, `S` in `S()._y["k"]`."""
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def violations(source: str) -> list[tuple[int, str]]:
    """(line, private name) for each use in `source` of another library's private API: a private name imported
    from it or reached from a name imported from it, an internal module of it, or a private name that
    private_apis.py uses (on anything but self/cls, or as a string)."""
    tree = ast.parse(source)
    imported = set()  # names bound to another library's modules or objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _third_party(alias.name):
                    imported.add(alias.asname or alias.name.split(".")[0])
                    found += [(node.lineno, part) for part in alias.name.split(".") if _private(part)]
                    found += [(node.lineno, alias.name) for m in INTERNAL_MODULES if (alias.name + ".").startswith(m + ".")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _third_party(node.module):
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                full = f"{node.module}.{alias.name}"
                found += [(node.lineno, part) for part in full.split(".") if _private(part)]
                found += [(node.lineno, full) for m in INTERNAL_MODULES if (full + ".").startswith(m + ".")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node.value)
            name = root.id if isinstance(root, ast.Name) else None
            if name in imported or (node.attr in KNOWN and name not in ("self", "cls")):
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Constant) and node.value in KNOWN:
            found.append((node.lineno, node.value))
    return sorted(set(found))


# ------------------------------------------------------------------------------------------------ the rule


def test_no_module_but_private_apis_uses_another_librarys_private_api():
    found = {}
    scanned = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "checkpoint" / "async_save.py" in scanned  # the subpackages too
    for path in scanned:
        if path.name != HOME:
            file = str(path.relative_to(PACKAGE))
            for line, name in violations(path.read_text()):
                found[(file, name)] = found.get((file, name), []) + [line]
    new = {f"{file}:{lines}: {name}" for (file, name), lines in found.items()}
    assert not new, f"use these through acctrain/private_apis.py (add a function there if none fits): {sorted(new)}"


@pytest.mark.parametrize("source", [
    "import torch\ntorch._foreach_mul_(grads, 2.0)",
    "def f(state):\n    return state._shared_state",
    "from accelerate.state import PartialState\nPartialState._shared_state['distributed_type'] = 1",
    "from accelerate.state import AcceleratorState as S\nS()._reset_state()",
    "import torch.nn as nn\nnn.modules.batchnorm._BatchNorm",
    "from torch._C._distributed_c10d import _dump_fr_trace_json",
    "import torch._dynamo",
    "def f(model):\n    return model._orig_mod",
    "fingerprint = getattr(dataset, '_fingerprint', None)",
    "def f(metric):\n    metric._update_count = 1",
    "from tensorboard.summary.writer import record_writer",
    "import numpy as np\nnp._core",
])
def test_the_scan_finds_a_private_use(source):
    assert violations(source), source


@pytest.mark.parametrize("source", [
    "import os\nos._exit(1)",  # the standard library's: public
    "import sys\nsys._getframe()",
    "class A:\n    def f(self):\n        return self._version + self._private",
    "from acctrain import watchdog\nwatchdog._Idle",  # acctrain's own
    "from acctrain.config import _coerce_types",
    "def f(suggestions):\n    return suggestions._asdict()",
    "import torch\ntorch.nn.Module.__init__",  # dunder: public
    "from acctrain import private_apis\nprivate_apis.foreach_mul_(grads, 2.0)",
])
def test_the_scan_leaves_what_is_not_another_librarys_private_api(source):
    assert not violations(source), source


def test_the_scan_knows_the_private_names_private_apis_uses():
    assert {"_version", "_foreach_lerp_", "_foreach_mul_", "_orig_mod", "_BatchNorm", "_dump_fr_trace_json",
            "_shared_state", "_mixed_precision", "_reset_state", "_defaults", "_reductions", "_to_sync",
            "_update_count", "_fingerprint"} <= KNOWN


# ----------------------------------------------------------------- each function, against the installed libraries

EXERCISED = set()


def exercises(*names):
    EXERCISED.update(names)
    return lambda test: test


@exercises("tensor_version")
def test_tensor_version_counts_in_place_changes_also_through_a_detached_view():
    tensor = torch.zeros(3, requires_grad=True)
    before = private_apis.tensor_version(tensor)
    tensor.detach().add_(1.0)  # async_save reads the version of the detached tensor
    assert private_apis.tensor_version(tensor) == before + 1
    assert private_apis.tensor_version(tensor.detach()) == before + 1
    tensor.detach().clone().mul_(2.0)  # a copy's change is not the tensor's
    assert private_apis.tensor_version(tensor) == before + 1


@exercises("foreach_lerp_", "foreach_mul_")
def test_foreach_ops_change_each_tensor_in_place_like_one_at_a_time():
    starts, ends = [torch.zeros(3), torch.full((2, 2), 2.0)], [torch.full((3,), 4.0), torch.ones(2, 2)]
    expected = [s.lerp(e, 0.25) for s, e in zip(starts, ends)]
    private_apis.foreach_lerp_(starts, ends, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(starts, expected))
    grads, factor = [torch.arange(3.0), torch.ones(2, 2)], torch.tensor(0.5)
    expected = [g * factor for g in grads]
    private_apis.foreach_mul_(grads, factor)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))


@exercises("COMPILE_WRAPPER", "uncompiled", "uncompiled_name")
def test_the_compiled_wrapper_is_seen_through_and_its_name_parts_removed():
    inner = torch.nn.Linear(2, 2)
    compiled = torch.compile(inner, backend="eager")  # wrapping only: nothing compiles before a call
    assert private_apis.uncompiled(compiled) is inner and private_apis.uncompiled(inner) is inner
    model = torch.nn.Sequential(torch.compile(torch.nn.Linear(2, 2), backend="eager"))
    keys = list(torch.compile(model, backend="eager").state_dict())
    assert keys == [f"{private_apis.COMPILE_WRAPPER}.0.{private_apis.COMPILE_WRAPPER}.weight",
                    f"{private_apis.COMPILE_WRAPPER}.0.{private_apis.COMPILE_WRAPPER}.bias"]
    assert [private_apis.uncompiled_name(k) for k in keys] == list(torch.nn.Sequential(torch.nn.Linear(2, 2)).state_dict())


@exercises("BATCH_NORM")
def test_batch_norm_is_the_base_of_every_batch_norm_layer_only():
    for cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
                torch.nn.LazyBatchNorm1d):
        assert issubclass(cls, private_apis.BATCH_NORM), cls
    for cls in (torch.nn.InstanceNorm1d, torch.nn.LayerNorm, torch.nn.GroupNorm):
        assert not issubclass(cls, private_apis.BATCH_NORM), cls


@exercises("dump_flight_recorder")
def test_the_flight_recorder_dumps_json():
    trace = private_apis.dump_flight_recorder()  # no process group here: a recorder with no entries
    assert "version" in json.loads(trace)


@exercises("accelerate_cached_precision", "reset_accelerate_state", "set_accelerate_fsdp_state")
def test_accelerates_cached_state_is_read_reset_and_set_to_fsdp():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")  # conftest resets Accelerate's state afterwards
    assert private_apis.accelerate_cached_precision("no") == "bf16"
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    private_apis.set_accelerate_fsdp_state(accelerator, plugin)
    assert accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin is plugin
    assert AcceleratorState().distributed_type == DistributedType.FSDP  # a later AcceleratorState() agrees
    private_apis.reset_accelerate_state()
    assert private_apis.accelerate_cached_precision("no") == "no"  # forgotten: the next Accelerator may choose
    assert PartialState().distributed_type == DistributedType.FSDP  # the process's part is kept
    assert Accelerator(cpu=True).mixed_precision == "no"


@exercises("metric_states", "set_metric_sync", "set_metric_update_count")
def test_a_torchmetrics_metric_is_computed_from_states_set_by_hand():
    pytest.importorskip("torchmetrics")
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.utilities.data import dim_zero_sum

    reference = MulticlassAccuracy(3, average="micro")
    reference.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    metric = MulticlassAccuracy(3, average="micro")
    defaults, reductions = private_apis.metric_states(metric)
    assert set(defaults) == set(reductions) == {"tp", "fp", "tn", "fn"}
    assert all(torch.is_tensor(d) for d in defaults.values()) and all(r is dim_zero_sum for r in reductions.values())
    metric.sync_on_compute = False
    private_apis.set_metric_sync(metric, False)
    for state in defaults:
        setattr(metric, state, getattr(reference, state).clone())
    private_apis.set_metric_update_count(metric, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics warns of a compute before any update without the count
        assert metric.compute() == reference.compute() == 0.75


@exercises("hf_fingerprint")
def test_a_hugging_face_datasets_fingerprint_follows_its_content():
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"x": [1, 2, 3]})
    fingerprint = private_apis.hf_fingerprint(rows)
    assert isinstance(fingerprint, str) and fingerprint
    assert private_apis.hf_fingerprint(datasets.Dataset.from_dict({"x": [1, 2, 3]})) == fingerprint
    assert private_apis.hf_fingerprint(rows.map(lambda r: {"x": r["x"] + 1})) != fingerprint
    assert private_apis.hf_fingerprint([1, 2, 3]) is None


@exercises("tensorboard_record_crc", "tensorboard_reference_crc", "set_tensorboard_record_crc")
def test_tensorboards_record_checksum_is_read_checked_and_replaced():
    from acctrain import tracking

    sample = bytes(range(256)) * 3
    assert private_apis.tensorboard_reference_crc(sample) == tracking.masked_crc32c(sample)
    current = private_apis.tensorboard_record_crc()
    assert callable(current) and current(sample) == tracking.masked_crc32c(sample)

    def replacement(data: bytes) -> int:
        return 0

    try:
        private_apis.set_tensorboard_record_crc(replacement)
        assert private_apis.tensorboard_record_crc() is replacement
    finally:
        private_apis.set_tensorboard_record_crc(current)
    assert private_apis.tensorboard_record_crc() is current


def test_every_function_of_private_apis_is_exercised_here():
    public = {name for name, value in vars(private_apis).items() if not name.startswith("_")
              and (name.isupper() or getattr(value, "__module__", None) == private_apis.__name__)}
    assert public == EXERCISED
