"""Data stage: load any common dataset format, normalise to chat messages, clean, quarantine, validate.

``validate_dataset`` is the training-data entry point (clean + quarantine + Great Expectations);
``read_messages`` loads held-out sets strictly. Modules:

* ``sources``      readers (JSONL streamed, JSON, CSV, Parquet, ``save_to_disk`` dirs, hub datasets)
* ``formats``      per-format normalisers to ``{"messages": [{"role", "content"}]}`` / ``{"text"}``
* ``text``         whitespace/Unicode normalisation and fingerprints
* ``dedup``        exact de-duplication in 8 bytes per distinct row (sorted numpy runs)
* ``cleaning``     the quarantine rules (:data:`REASONS`) and decontamination
* ``tokens``       rows templated and tokenized in batches, as ``formatting.tokenize_row`` does one at a time
* ``writer``       streams rows into ``clean.jsonl`` / ``quarantine.jsonl``
* ``profile``      the text-free derived-column table GX validates, in chunks, and its exact statistics
* ``expectations`` the GX suite, run chunk by chunk into one validation result and Data Docs
* ``report``       failure rules and ``report.json``
* ``stage``        ``validate_dataset`` / ``read_messages``
"""

from lora_pipeline.data.reasons import REASONS, DataError
from lora_pipeline.data.stage import ValidationResult, read_messages, validate_dataset

__all__ = ["REASONS", "DataError", "ValidationResult", "read_messages", "validate_dataset"]
