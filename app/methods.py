"""The job methods the API accepts.

A copy of ``cnc_core.job.METHODS``: the API never imports ``cnc_core`` (no torch in its
image), and ``tests/test_import_rules.py`` asserts the two lists are equal.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("cnc", "cnc-paper", "clp", "compress")
