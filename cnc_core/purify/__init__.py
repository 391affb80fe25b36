"""Data-free backdoor removal: synthetic data, proxies, fine-tuning, baselines, pipeline.

Submodules are imported lazily by their users (``cnc_core.purify.pipeline`` pulls in the
compression engine); import what you need from the submodule itself, e.g.
``from cnc_core.purify.pipeline import PurifyConfig, purify``.
"""
