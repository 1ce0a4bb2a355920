"""CLI start-up, measured side by side: ``lora-pipeline --help`` and ``show-config`` against the bare import.

Each command runs ``--repeats`` times in a fresh interpreter (the first run of each is a warm-up, not
counted: it fills the OS file cache); the medians and their ratios to ``python -c "import lora_pipeline"``
are reported, with the heavy libraries each command imported (target: none for these two commands;
ratio <= 1.5x, see issue 12).

Usage: ``.venv/bin/python -m benchmarks.startup [--repeats 7] [--out outputs/benchmarks]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "trl", "mlflow", "prefect", "great_expectations")
COMMANDS = {
    "import lora_pipeline": "import lora_pipeline",
    "lora-pipeline --help":
        "from lora_pipeline.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "lora-pipeline show-config": "from lora_pipeline.cli import main\nmain(['show-config'])",
}


def _seconds(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def _heavy_imports(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return json.loads(done.stderr.strip().splitlines()[-1].replace("'", '"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    args = parser.parse_args()
    medians = {}
    for name, code in COMMANDS.items():
        _seconds(code)  # warm-up
        medians[name] = statistics.median(_seconds(code) for _ in range(args.repeats))
    baseline = medians["import lora_pipeline"]
    results = {name: {"median_seconds": round(seconds, 4), "ratio_to_import": round(seconds / baseline, 2),
                      "heavy_imports": _heavy_imports(COMMANDS[name])} for name, seconds in medians.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
