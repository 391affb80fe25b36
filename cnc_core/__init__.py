"""cnc_core: data-free backdoor removal and compression of CNN classifiers.

Implements and extends Phan et al., "Clean & Compact: Efficient Data-Free Backdoor
Defense with Model Compactness", ECCV 2024. Pure library: torch, tensorly, numpy.

The public entry points, importable from here (loaded on first use, so importing
``cnc_core`` stays cheap)::

    from cnc_core import create_model, load_checkpoint, compress, CompressConfig
    from cnc_core import purify, PurifyConfig, run_job, JobConfig, load_compact
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "cnc_core.models",
    "list_models": "cnc_core.models",
    "read_state_dict": "cnc_core.io",
    "load_checkpoint": "cnc_core.io",
    "CheckpointError": "cnc_core.io",
    "compress": "cnc_core.compress",
    "CompressConfig": "cnc_core.compress",
    "CompressResult": "cnc_core.compress",
    "CompressionError": "cnc_core.compress",
    "purify": "cnc_core.purify.pipeline",
    "PurifyConfig": "cnc_core.purify.pipeline",
    "PurifyResult": "cnc_core.purify.pipeline",
    "run_job": "cnc_core.job",
    "JobConfig": "cnc_core.job",
    "JobResult": "cnc_core.job",
    "save_compact": "cnc_core.export",
    "load_compact": "cnc_core.export",
    "Cancelled": "cnc_core.progress",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cnc_core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
