"""The run folder: its file names, the adapters, the report and the lock."""
