"""Prefect tasks: thin wrappers (retries, timeouts, caching) over one library call each."""
