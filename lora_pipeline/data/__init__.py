"""Data stage: load any common dataset format, normalise to chat messages, clean, quarantine, validate.

``validate_dataset`` is the training-data entry point (clean + quarantine + Great Expectations);
``read_messages`` loads held-out sets strictly. Modules:

* ``sources``      readers (JSONL streamed, JSON, CSV, Parquet, ``save_to_disk`` dirs, hub datasets)
* ``formats``      per-format normalisers to ``{"messages": [{"role", "content"}]}`` / ``{"text"}``
* ``text``         whitespace/Unicode normalisation and fingerprints
* ``cleaning``     the quarantine rules (:data:`REASONS`) and decontamination
* ``writer``       streams rows into ``clean.jsonl`` / ``quarantine.jsonl``
* ``profile``      the text-free derived-column table GX validates
* ``expectations`` the GX suite, validation result and Data Docs
* ``report``       failure rules and ``report.json``
* ``stage``        ``validate_dataset`` / ``read_messages``
"""

from lora_pipeline.data.reasons import REASONS, DataError
from lora_pipeline.data.stage import ValidationResult, read_messages, validate_dataset

__all__ = ["REASONS", "DataError", "ValidationResult", "read_messages", "validate_dataset"]
