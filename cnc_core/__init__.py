"""cnc_core: data-free backdoor removal and compression of CNN classifiers.

Implements and extends Phan et al., "Clean & Compact: Efficient Data-Free Backdoor
Defense with Model Compactness", ECCV 2024. Pure library: torch, tensorly, numpy.
"""

__version__ = "0.1.0"
