"""Register the tiny model once, starting together with its siblings (for the concurrency test).

Usage: python -m tests.helpers.register_concurrently URI RUN_ID MODEL_DIR NAME RUN_KEY BARRIER_DIR N
Each process imports everything first, then marks itself ready in BARRIER_DIR and waits until N
processes are ready, so the registrations really overlap. Prints the RegisteredVersion as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from lora_pipeline.config import RegistryConfig
from lora_pipeline.registry import register_model


def main() -> None:
    uri, run_id, model_dir, name, run_key, barrier, n = sys.argv[1:8]
    barrier_dir = Path(barrier)
    (barrier_dir / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(barrier_dir.iterdir())) < int(n):
        if time.monotonic() > deadline:
            raise SystemExit("siblings never became ready")
        time.sleep(0.01)
    version = register_model(tracking_uri=uri, run_id=run_id, model_dir=Path(model_dir),
                             registry_cfg=RegistryConfig(model_name=name), run_key=run_key,
                             tags={"data_hash": run_key}, input_example="hello")
    print(json.dumps(asdict(version)))


if __name__ == "__main__":
    main()
