"""The training `output_dir`: never trained into twice by accident, resumed only from complete checkpoints.

    from sara_moe.runtime.checkpoints import prepare_output_dir, last_complete_checkpoint
    resume = prepare_output_dir("runs/sara", resume=True, overwrite=False)   # -> "runs/sara/checkpoint-10"

`prepare_output_dir` runs before the model is loaded:

- a non-empty `output_dir` is refused (one line saying whether it holds a finished run or an
  unfinished one) unless the run resumes (`--resume_from_checkpoint`) or replaces it
  (`--overwrite_output_dir`, the flag's name in Hugging Face's Trainer), which deletes the
  old run's files first, so a stale `checkpoint-10` never sits beside a new `checkpoint-3`
  (and `resume_from_checkpoint true` cannot later pick it);
- `--resume_from_checkpoint true` resumes from the newest *complete* checkpoint. Trainer
  writes `trainer_state.json` last, so a checkpoint without it, or with a truncated
  safetensors file, was cut by a kill during its write: it is moved aside to
  `incomplete-checkpoint-N` (a name Trainer's checkpoint search and rotation ignore; nothing
  is deleted) and the message says which checkpoint the run resumes from instead.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from sara_moe.runtime.artifacts import ArtifactError, check_safetensors

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None."""
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            check_safetensors(weights)
        except ArtifactError:
            return f"{weights.name} is truncated"
    return None


def last_complete_checkpoint(output_dir, announce=print) -> Path | None:
    """Newest complete `checkpoint-N`; newer incomplete ones are moved aside and announced."""
    folder = Path(output_dir)
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name)))
    for step, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        aside, k = folder / f"incomplete-{path.name}", 1
        while aside.exists():
            aside, k = folder / f"incomplete-{path.name}-{k}", k + 1
        try:
            path.rename(aside)
        except FileNotFoundError:  # another process of a distributed launch moved it first
            continue
        announce(f"sara train: {path} is incomplete ({problem}; interrupted while it was written), moved to "
                 f"{aside.name}; resuming from the previous complete checkpoint")
    return None


def _announce(message: str) -> None:
    print(message, file=sys.stderr)


def prepare_output_dir(output_dir, resume=None, overwrite: bool = False, announce=_announce):
    """Apply the output_dir rules above; returns what to pass as Trainer's `resume_from_checkpoint`."""
    folder = Path(output_dir)
    if isinstance(resume, str) and resume.lower() in ("true", "latest"):
        resume = True
    if isinstance(resume, str) and resume.lower() in ("false", ""):
        resume = None
    contents = sorted(folder.iterdir()) if folder.is_dir() else []
    if resume is True:
        last = last_complete_checkpoint(folder, announce) if contents else None
        if last is None:
            raise ArtifactError(f"{folder}: no complete checkpoint to resume from; drop --resume_from_checkpoint "
                                "to start a new run")
        announce(f"sara train: resuming from {last}")
        return str(last)
    if resume:
        problem = checkpoint_problem(Path(resume)) if Path(resume).is_dir() else "no such directory"
        if problem:
            raise ArtifactError(f"{resume}: cannot resume from it ({problem}); pick a complete checkpoint-N")
        return str(resume)
    if contents and overwrite:
        for path in contents:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        announce(f"sara train: --overwrite_output_dir: removed the previous run's files from {folder}")
    elif contents:
        finished = (folder / "trainer_state.json").is_file()
        what = "a finished run" if finished else "files of an unfinished run (e.g. its checkpoints)"
        raise ArtifactError(f"{folder} holds {what}; choose another output_dir, pass --overwrite_output_dir to "
                            "replace it" + ("" if finished else " or --resume_from_checkpoint true to continue it"))
    return None
