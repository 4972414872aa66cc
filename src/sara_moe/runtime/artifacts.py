"""Every artefact sara-moe writes or reads back goes through here: publish, fingerprint, describe.

    from sara_moe.runtime import artifacts
    artifacts.claim("runs/analysis", "analysis.json", overwrite=False)   # fail fast, before hours of work
    with artifacts.publishing("runs/analysis", overwrite=False) as staging:
        (staging / "analysis.json").write_text(...)                       # visible only when the block ends
    artifacts.write_json("runs/x/results.json", {...}, overwrite=False)  # one atomic file
    artifacts.wait_for_main()                                             # under a launcher: files exist on return
    artifacts.write_json("runs/x/analyze_config.json", artifacts.config_dict(cfg))  # a verb's resolved config
    artifacts.text_sha(value)                                             # per-example data hash
    artifacts.run_metadata(config={...}, seed=0, device="cpu")            # versions, commit, command line

**Publishing.** Files are written into a staging folder created *beside* the target (same
folder, hence the same filesystem, so the final `rename` never crosses devices), every file
is fsynced, then renamed into place and the folder is fsynced. An existing target is refused
(`ArtifactError`, naming the path and the flag that allows it) unless `overwrite`; a failure
removes the staging folder, so a partial output never appears under the final name. A
directory artefact is published file by file into its folder (other files there are left
alone) with its *primary* file (e.g. `analysis.json`) last, so the primary file's presence
means the set is complete.

**Multi-process runs** (torchrun, accelerate launch): only the main process (rank 0) writes.
On every other rank the publishing helpers are no-ops: `write_*` and `save_safetensors`
serialise nothing, `publishing` / `publishing_file` hand the stage a scratch location that is
thrown away, and nothing is checked against the target (rank 0 may already have published
it). Stages call them on every rank with the reduced data, exactly as one process does, then
`wait_for_main()` so that no rank returns before the outputs exist. A rank's own files (its
resume shards) are written inside `rank_local()`. `unique_stamp` is rank 0's stamp on every rank.

**Hashes**: `sha` (canonical JSON), `text_sha` (one example's text, the data part of every
fingerprint), `file_sha256`. The model part of a fingerprint is `architectures.fingerprint`:
it needs the routers, and this module sits below the architectures.

**Results metadata** (`run_metadata`): sara-moe version, git commit (and whether the tree
was dirty) when run from a checkout, python/torch/transformers/trl/peft versions, device,
seed, command line, time and the resolved config — what lm-eval's results files carry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from sara_moe.runtime import distributed


class ArtifactError(ValueError):
    """An output that would be overwritten, or an input file that is damaged; one line naming the path."""


# ----------------------------------------------------------------------------- publishing


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RANK_LOCAL = [0]  # depth of open `rank_local` blocks


def writes_here() -> bool:
    """True where this process writes outputs: one process, rank 0 of a launch, or inside `rank_local`."""
    return _RANK_LOCAL[0] > 0 or distributed.launch_rank() == 0


@contextlib.contextmanager
def rank_local():
    """Inside this block every rank writes what it is asked to (files private to a rank, e.g. resume shards)."""
    _RANK_LOCAL[0] += 1
    try:
        yield
    finally:
        _RANK_LOCAL[0] -= 1


def wait_for_main() -> None:
    """Under a launcher every rank waits here until rank 0 has published what it was asked to before."""
    if distributed.launched():
        distributed.init()  # a stage that never joined the launcher's process group joins it here
        distributed.barrier()


def refuse_existing(path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raise ArtifactError if `path` exists and `overwrite` is off."""
    if Path(path).exists() and not overwrite:
        raise ArtifactError(f"{path} exists; choose another output or pass {flag} to replace it")


def claim(folder, primary: str, overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Fail fast, before the work, if `folder/primary` (the artefact's completion mark) exists."""
    refuse_existing(Path(folder) / primary, overwrite, flag)


@contextlib.contextmanager
def publishing(folder, overwrite: bool = False, primary: str | None = None, flag: str = "--overwrite"):
    """Yield a staging folder beside `folder`; on success move its files into `folder` atomically.

    Each staged name must be new in `folder` unless `overwrite`; `primary` is moved last.
    """
    folder = Path(folder)
    if not writes_here():  # another rank publishes: the stage's files go to scratch and are dropped
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.rank{distributed.launch_rank()}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        yield staging
        names = sorted(p.name for p in staging.iterdir())
        if primary in names:
            names.remove(primary)
            names.append(primary)
        for name in names:
            refuse_existing(folder / name, overwrite, flag)
        for name in names:
            for path in ([staging / name] if (staging / name).is_file() else
                         [p for p in (staging / name).rglob("*") if p.is_file()]):
                _fsync_file(path)
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = folder / name
            if target.is_dir() and not (staging / name).is_file():
                shutil.rmtree(target)  # overwrite of a sub-folder (e.g. a saved tokenizer)
            os.replace(staging / name, target)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def publishing_file(path, overwrite: bool = True, flag: str = "--overwrite"):
    """Yield a temporary path beside `path`; on success fsync it and rename it to `path`."""
    path = Path(path)
    if not writes_here():
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.rank{distributed.launch_rank()}-"))
        try:
            yield scratch / path.name
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    refuse_existing(path, overwrite, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(Path(tmp))
        refuse_existing(path, overwrite, flag)  # someone may have written it meanwhile
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path, text: str, overwrite: bool = True, flag: str = "--overwrite") -> Path:
    """Write `text` (UTF-8) to `path` atomically (on the rank that writes; see the module docstring)."""
    if not writes_here():
        return Path(path)
    with publishing_file(path, overwrite, flag) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path, obj, overwrite: bool = True, flag: str = "--overwrite") -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", overwrite, flag)


def config_dict(cfg) -> dict:
    """A verb's config dataclass as JSON-able data: every field, as `--config` reads it back."""
    if hasattr(cfg, "to_dict"):  # TrainingArguments (SaraConfig): enums as values, hub tokens masked
        return cfg.to_dict()
    return json.loads(json.dumps(dataclasses.asdict(cfg), ensure_ascii=False, default=str))


def write_jsonl(path, rows, overwrite: bool = True, flag: str = "--overwrite") -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), overwrite, flag)


def save_safetensors(path, tensors: dict, metadata: dict | None = None, overwrite: bool = True,
                     flag: str = "--overwrite") -> Path:
    from safetensors.torch import save_file

    if not writes_here():
        return Path(path)
    with publishing_file(path, overwrite, flag) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def unique_stamp(folder) -> str:
    """A timestamp no earlier output in `folder` uses (timestamped results never overwrite).

    Under a launcher every rank gets rank 0's stamp, so every rank names the same files."""
    base = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    stamp, k = base, 1
    while any(Path(folder).glob(f"*_{stamp}*")):
        stamp, k = f"{base}-{k}", k + 1
    if not distributed.launched():
        return stamp
    import torch

    distributed.init()
    code = torch.zeros(64, dtype=torch.int64)
    code[:len(stamp)] = torch.tensor(list(stamp.encode("ascii")), dtype=torch.int64)
    code = distributed.from_main(code)
    return bytes(code[code > 0].tolist()).decode("ascii")


# ----------------------------------------------------------------------------- reading back


def check_safetensors(path) -> None:
    """Raise ArtifactError (one line) if `path` is not a complete safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path}: truncated safetensors file ({size} bytes); re-save or re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ArtifactError(f"{path}: truncated safetensors file ({size} bytes, header alone needs "
                                f"{header_len + 8}); re-save or re-download it")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ArtifactError(f"{path}: not a safetensors file (unreadable header)") from None
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ArtifactError(f"{path}: truncated safetensors file ({size} bytes, its header needs "
                            f"{8 + header_len + end}); re-save or re-download it")


# ----------------------------------------------------------------------------- fingerprints


def sha(obj, length: int = 16) -> str:
    """Short sha256 of a string or of any JSON-able object (canonical key order)."""
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def text_sha(value) -> str:
    """Hash of one example's text (string, prompt/response pair or messages list)."""
    return sha(value)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- results metadata


def _git_commit() -> dict | None:
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


_COMMAND: list | None = None


def set_command(argv: list) -> None:
    """Record the command line as the user typed it (`sara` verbs call this; default: sys.argv)."""
    global _COMMAND
    _COMMAND = [str(a) for a in argv]


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def describe_device(device=None) -> str:
    import torch

    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def run_metadata(config=None, seed=None, device=None) -> dict:
    """What produced an artefact: versions, commit, device, seed, command line, time, resolved config."""
    return {
        "sara_moe_version": _version("sara-moe"), "git": _git_commit(),
        "versions": {"python": sys.version.split()[0],
                     **{name: _version(name) for name in ("torch", "transformers", "trl", "peft", "datasets")}},
        "device": describe_device(device), "seed": seed,
        "command": _COMMAND or [Path(sys.argv[0]).name, *sys.argv[1:]],
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": config,
    }
