"""JSON Schemas of parity's machine-readable outputs (``plan.schema.json``: ``parity plan --json``)."""
