"""Causes of a preview/inference mismatch that can be read from the settings alone (no replay needed).

The rules live in one registry, :mod:`parity.lint`; this module keeps the names ``parity check`` uses:
:func:`item_causes` (the registry's ``in_check`` rules for one preview) and :func:`lora_keys_cause`.
"""

from __future__ import annotations

from parity.lint import LintContext, item_causes, lora_keys_cause

__all__ = ["LintContext", "item_causes", "lora_keys_cause"]
