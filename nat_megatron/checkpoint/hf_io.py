"""Read and write Hugging Face safetensors directories one tensor at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


class HFReader:
    """Lazy tensor access to an HF checkpoint (single file or sharded with an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        self._open = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ValueError(f"tensor {name!r} is missing from the HF checkpoint {self.path}")
        file = self.where[name]
        if file not in self._open:
            self._open[file] = safe_open(self.path / file, "pt")
        return self._open[file].get_tensor(name)


class HFWriter:
    """Writes tensors into size-limited safetensors shards plus the index transformers reads."""

    def __init__(self, out: str | Path, *, shard_bytes: int = 2 * 1024**3):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        # A copy: the tensor may be a view into a buffer that is reused (weight streaming), and
        # safetensors refuses tensors that share storage.
        t = tensor.detach().to("cpu", copy=True).contiguous()
        if self.pending and self.pending_bytes + t.nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += t.nbytes
        self.total += t.nbytes

    def _flush(self) -> None:
        idx = len(self.files)
        save_file(self.pending, self.out / f"part-{idx:05d}.safetensors", metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"part-{i:05d}.safetensors").rename(self.out / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy whichever tokenizer/generation files exist in src; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def publish_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` in place of `final` by renames, so that `final` is
    always either the old complete directory or the new one (a crash between the two renames
    leaves the old one as `<final>.old`)."""
    from nat_megatron.checkpoint.integrity import fsync_dir, fsync_file

    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_hf_export(out: str | Path, tensors, *, source_dir: str | Path, write: bool) -> None:
    """An HF directory at `out` from (name, tensor) pairs plus source_dir's config and tokenizer.

    Written into `<out>.partial/` and renamed into place when complete, so an interrupted
    export never leaves a half-written model where a user would load it. Every rank iterates
    `tensors` (they may be collectives); only the one with write=True writes.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    writer = None
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
        writer = HFWriter(tmp)
    for name, tensor in tensors:
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.close()
        shutil.copy2(Path(source_dir) / "config.json", tmp / "config.json")
        copy_tokenizer_files(source_dir, tmp)
        publish_dir(tmp, out)
