"""Whether the files of a checkpoint are whole, by their contents: a file cut short by a kill, a full disk or a bad
copy is caught without loading it. safetensors by its header; torch.save files by their zip directory;
torch.distributed.checkpoint (FSDP's sharded state dicts) by the byte ranges its metadata lists; DeepSpeed by its tag
folder's model and optimizer files, one partition per rank.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from pathlib import Path


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (None: fine). The header lists every tensor's byte range, so a file cut
    short by a kill or a full disk is caught without reading the tensors."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size:
                return f"{path.name} is truncated"
            header = json.loads(f.read(header_size))
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return f"{path.name} is unreadable (truncated?)"
    expected = 8 + header_size + end
    return None if size == expected else f"{path.name} is truncated ({size} of {expected} bytes)"


def torch_file_problem(path: Path) -> str | None:
    """Why a torch.save file is unusable. torch writes a zip whose directory sits at the end of the file: a cut-off
    file has none. (A legacy pickle file can only be checked for being non-empty.)"""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as error:
        return f"{path.name} is unreadable ({error})"
    if not head:
        return f"{path.name} is empty"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"{path.name} is truncated"
    return None


def file_problem(path: Path) -> str | None:
    return safetensors_problem(path) if path.suffix == ".safetensors" else torch_file_problem(path)


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Reads the ``.metadata`` of a torch.distributed.checkpoint folder (a pickle) refusing every class but the
    metadata's own: a planted file can never run code here."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        import torch

        if (module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def dcp_problems(folder: Path) -> list[str]:
    """Why a torch.distributed.checkpoint folder (FSDP's SHARDED_STATE_DICT: ``.metadata`` and ``__<rank>_0.distcp``
    files) is unusable: its metadata lists the byte range of every tensor in its shard files, so each shard must be
    there and at least that long."""
    where = f"{folder.name}/.metadata"
    try:
        with (folder / ".metadata").open("rb") as f:
            storage = _DCPMetadataUnpickler(f).load().storage_data
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except FileNotFoundError:
        return [f"{where} is missing"]
    except Exception:  # noqa: BLE001 - whatever is wrong with it, the shards cannot be located
        return [f"{where} is unreadable (truncated, or not a checkpoint's metadata)"]
    problems = []
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"shard {folder.name}/{name} is missing")
        elif (have := path.stat().st_size) < size:
            problems.append(f"{folder.name}/{name} is truncated ({have} of {size} bytes)")
    return problems


def deepspeed_problems(folder: Path, training_state: bool = True, world_size: int | None = None) -> list[str]:
    """Why a DeepSpeed checkpoint is unusable: ``latest`` names its tag folder (``global_step<N>``), which holds the
    model states (one file, or one per rank under ZeRO-3) and, for a resumable checkpoint, the optimizer partition of
    every rank (``world_size``, when known); each a torch zip file with its directory."""
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        tag_dir = folder / tag
        if not tag or not tag_dir.is_dir():
            return [f"latest names {tag!r}, which is not a folder of the checkpoint"]
    else:
        tag_dir = max(folder.glob("global_step*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    model_files, optim_files = sorted(tag_dir.glob("*model_states.pt")), sorted(tag_dir.glob("*optim_states.pt"))
    problems = [] if model_files else [f"{tag_dir.name} holds no model states"]
    checked = model_files
    if training_state:
        ranks = sorted(int(m.group(1)) for path in optim_files if (m := re.search(r"zero_pp_rank_(\d+)_", path.name)))
        expected = list(range(world_size if world_size else (max(ranks) + 1 if ranks else 1)))
        if ranks != expected:
            problems.append(f"{tag_dir.name} holds the optimizer partitions of ranks {ranks}, not of all "
                            f"{len(expected)} processes")
        checked = checked + optim_files
    problems += [f"{tag_dir.name}/{problem}" for path in checked if (problem := torch_file_problem(path))]
    return problems
