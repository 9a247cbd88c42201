"""`acctrain verify`: every checkpoint of a run checked as a resume would check it, without changing anything.

    acctrain verify RUN_DIR          # each checkpoint: ok or what is wrong; which one resume=auto would take
    acctrain verify CHECKPOINT_DIR   # that checkpoint

Each checkpoint is checked by acctrain.checkpoint's `verify`: the manifest, every file's size and digest, the
format version, the files the checkpoint must hold (every rank's RNG state, what its trainer_state.json says
it holds) and every safetensors header (names, dtypes, shapes, offsets). Whether it fits a model is checked
when a run resumes it, with the model at hand. The command reads only: a commit that a kill interrupted is
reported, and finished by the next resume.

Exit status: 0 when the checkpoint named, or the one resume=auto would try first, is intact; 1 when it is
damaged (resume=auto would fall back to an older one, or start afresh); 2 for a path that is neither a
checkpoint nor a run's output_dir.
"""

from __future__ import annotations

from pathlib import Path

from acctrain import checkpoint

OK, DAMAGED, NOT_FOUND = 0, 1, 2


def verify_main(args: list[str]) -> int:
    if len(args) != 1:
        print("usage: acctrain verify CHECKPOINT_DIR|RUN_DIR")
        return NOT_FOUND
    path = Path(args[0])
    if (path / checkpoint.MANIFEST).is_file() or checkpoint.STEP_DIR.match(path.name):
        problem = _check(path)
        print(_line(path, problem))
        return DAMAGED if problem else OK
    if not checkpoint.checkpoints_root(path).is_dir():
        print(f"error: {path} is neither a checkpoint (no {checkpoint.MANIFEST}) nor a run's output_dir (no "
              f"{checkpoint.checkpoints_root(path)})")
        return NOT_FOUND
    return _report_run(path)


def _report_run(run_dir: Path) -> int:
    root = checkpoint.checkpoints_root(run_dir)
    pending = [stage for stage in sorted(root.glob("step-*.tmp")) if (stage / checkpoint.MANIFEST).is_file()
               and not stage.with_name(stage.name.removesuffix(".tmp")).exists()]
    order = pending[:1] + checkpoint.resume_order(run_dir)
    results = {path: _check(path) for path in order}
    latest = checkpoint.latest_checkpoint(run_dir)
    print(f"{run_dir}: {len(order)} checkpoint(s); `latest` names {latest.name if latest else 'none'}")
    for path in sorted(results, key=lambda p: p.name):
        note = " (a commit a kill interrupted: the next resume finishes it)" if path in pending else ""
        print(_line(path, results[path]) + note)
    chosen = next((path for path in order if results[path] is None), None)
    if chosen is None:
        print("resume=auto would start afresh: no checkpoint is intact" if order else
              "resume=auto would start afresh: no checkpoint yet")
        return DAMAGED if order else OK
    print(f"resume=auto would take {chosen.name}")
    if chosen != order[0]:
        print(f"damaged: {order[0].name}, which resume=auto tries first, fails its checks; a resume would go back "
              f"to {chosen.name}")
        return DAMAGED
    return OK


def _check(path: Path) -> str | None:
    """What is wrong with a checkpoint, or None."""
    try:
        checkpoint.verify(path)
    except checkpoint.CheckpointError as err:
        return str(err)
    except OSError as err:
        return f"unreadable: {err}"
    return None


def _line(path: Path, problem: str | None) -> str:
    if problem is not None:
        return f"  {path.name}: DAMAGED: {problem}"
    state = checkpoint.read_json(path / "trainer_state.json")
    versions = state.get("versions", {})
    return (f"  {path.name}: ok: optimizer step {state['state']['step']}, {state['plan'].get('world_size')} "
            f"process(es), format {checkpoint.format_version(path)}, written by acctrain "
            f"{versions.get('acctrain', '(unknown)')} (torch {versions.get('torch', '?')})")
