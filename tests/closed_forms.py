"""The closed forms of docs/conventions.md section 2 as numpy tensors over all index tuples.

Typed here from the literature (Saad & Solla 1995), independently of derive/,
and shared by the tests that check generated kernels against them.
"""

from __future__ import annotations

import importlib

import numpy as np


def load(name):
    """A generated kernel module by name, e.g. ``load("anil_erf")``."""
    return importlib.import_module(f"generated.{name}")


def tensors_erf(C):
    """I2[a,b], I3[a,b,c], I4[a,b,c,d], J2[a,b] for g = erf(z/sqrt 2) (Saad & Solla 1995)."""
    n = C.shape[0]
    d = np.diag(C)
    A = d[:, None]
    B = d[None, :]
    I2 = (2 / np.pi) * np.arcsin(C / np.sqrt((1 + A) * (1 + B)))
    J2 = (2 / np.pi) / np.sqrt((1 + A) * (1 + B) - C**2)

    # I3: axes (a, b, c)
    Caa = d[:, None, None]
    Ccc = d[None, None, :]
    Cab = C[:, :, None]
    Cac = C[:, None, :]
    Cbc = C[None, :, :]
    L3 = (1 + Caa) * (1 + Ccc) - Cac**2
    I3 = (2 / np.pi) / np.sqrt(L3) * (Cbc * (1 + Caa) - Cab * Cac) / (1 + Caa)

    # I4: axes (a, b, c, d)
    s = np.s_
    Caa = d[s[:, None, None, None]]
    Cbb = d[s[None, :, None, None]]
    Ccc = d[s[None, None, :, None]]
    Cdd = d[s[None, None, None, :]]
    Cab = C[s[:, :, None, None]]
    Cac = C[s[:, None, :, None]]
    Cad = C[s[:, None, None, :]]
    Cbc = C[s[None, :, :, None]]
    Cbd = C[s[None, :, None, :]]
    Ccd = C[s[None, None, :, :]]
    L4 = (1 + Caa) * (1 + Cbb) - Cab**2
    L0 = L4 * Ccd - Cbc * Cbd * (1 + Caa) - Cac * Cad * (1 + Cbb) + Cab * Cac * Cbd + Cab * Cad * Cbc
    L1 = L4 * (1 + Ccc) - Cbc**2 * (1 + Caa) - Cac**2 * (1 + Cbb) + 2 * Cab * Cac * Cbc
    L2 = L4 * (1 + Cdd) - Cbd**2 * (1 + Caa) - Cad**2 * (1 + Cbb) + 2 * Cab * Cad * Cbd
    I4 = (4 / np.pi**2) / np.sqrt(L4) * np.arcsin(L0 / np.sqrt(L1 * L2))
    assert I4.shape == (n,) * 4
    return I2, I3, I4, J2


def tensors_linear(C):
    """g(z) = z: I2 = C_ab, I3 = C_bc, I4 = C_cd, J2 = 1 (Isserlis)."""
    n = C.shape[0]
    I2 = C.copy()
    I3 = np.broadcast_to(C[None, :, :], (n, n, n))
    I4 = np.broadcast_to(C[None, None, :, :], (n, n, n, n))
    J2 = np.ones((n, n))
    return I2, I3, I4, J2


TENSORS = {"erf": tensors_erf, "linear": tensors_linear}
