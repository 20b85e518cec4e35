"""derive: symbolic derivation of order-parameter flows into numba kernels.

Stages, one module each: model definition (``model``, ``models/``) ->
expansion into terms (``expand``) -> Gaussian primitives (``gaussian``) ->
flow IR (``flow``) -> rendered module (``codegen``, ``templates/``).
"""

__version__ = "0.1.0"
