"""Names the generated kernels use, which a model's own names must not take.

A model's parameters, vectors and task vectors become local variables of the
generated functions (``eta = p[0]``, ``v = y[...]``); a model name equal to a
kernel argument, a loop index, a temporary, a helper or a module name would
silently rebind it. ``Param``, ``Vector`` and ``TaskVector`` (derive/model.py)
refuse such names when they are constructed. tests/test_model_definition.py
parses every generated module and fails when a kernel uses a name this list
does not cover.
"""

from __future__ import annotations

import builtins
import keyword
import re

# name -> what the generated kernels use it for
_GROUPS = {
    "a kernel argument": ("y c p K M dy C out dt n_steps record_every traj first_record ws dC with_optimal"),
    "an order parameter or its derivative": "Q R T dQ dR",
    "a loop index": "i j k l m n o",
    "a temporary": (
        "acc tmp x q u w vec rows probe chunk n_chunks n_pairs pair_k pair_l pref big det ax "
        "xa xb ua ub A B Bm Cm Cu Ct Ct1 Da Db Dm Dn F G Gopt dA dG dCm dDm d_mu da rate spread steps"
    ),
    "a field or the label noise": "lam nu nu_task zeta z",
    "the activation and its derivatives": "g gp gpp",
    "a module name or a numba name": "math np numba njit objmode prange",
    "a kernel function": (
        "covariance workspace workspace_parallel rhs rhs_ws rhs_parallel rhs_parallel_ws metrics "
        "sample_gradients task_moments support_matrices support_matrices_dir run_euler run_rk4 "
        "outlined_reached "
        "run_euler_parallel run_rk4_parallel"
    ),
    "a module constant": (
        "MODEL ACTIVATION INPUTS_SHA256 PARAMS STATE CONSTS VECTORS METRICS SAMPLES N_CHUNKS OUTLINED"
    ),
    "a stack of a table's buffers, one slice per chunk of pairs": "Dn_c X_c P_c F_c",
    "the inner loop's readout map": "A_S",
    "the packed table of a pair tilt": "P X",
    "a contraction of the pair table or a table at C (derive/codegen.py)": "PW packed_dot packed_offsets",
    "an array of the finite-support-set moments (derive/meta.py)": (
        "AV_s F1_s F2_s Pi_s Sig_s V_s X_s ZL_s Zmu_s lV_s mL_s mmu_s G4_tables G4t_rows"
    ),
    "a variable of the adaptive integrator": (
        "alpha alpha_new at atol attempt clock counts e err2 final fresh growth h last_record "
        "max_attempts rtol scale status t_end theta y_new"
    ),
}

_KERNELS = "the generated kernels use it as "
RESERVED: dict[str, str] = {name: _KERNELS + why for why, names in _GROUPS.items() for name in names.split()}
RESERVED.update({name: "it is a Python keyword" for name in keyword.kwlist + keyword.softkwlist})
_BUILTIN = "it is a Python builtin the kernels may call"
RESERVED.update({name: _BUILTIN for name in dir(builtins) if not name.startswith("_")})

# families of names: numbered temporaries and names derived from a model's names
RESERVED_PATTERNS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(pattern), _KERNELS + why)
    for pattern, why in (
        (r"[A-Za-z]\d+", "a numbered temporary or loop index (t0, s0, j0, m0, k1, ...)"),
        (r"_\w*", "a private helper or a throwaway name (_sensitivity, _)"),
        (r"\w*_", "a loop index or helper ending in an underscore (i_, mm_, asin_)"),
        (r"d?C_[a-z]{2}", "an entry of a primitive's covariance (C_ab, dC_ab)"),
        (r"[GIJ]\d\w*|E_\w+", "a Gaussian primitive (I2, I4, J2, G4, E_id_g, I2_dir, G4_dir)"),
        (r"tilt\w*", "the tilted-Gaussian tables (tilt_pref, tilt1_all)"),
        (r"mu_\w+", "the mean of a task vector (mu_NAME)"),
        (r"S_\w+__\w+", "a covariance of task vectors (S_NAME__OTHER)"),
        (r"L_\w+", "a factor of a task vector's covariance (L_NAME)"),
        (r"H_\w+", "the per-sample gradient of a readout (H_NAME)"),
        (r"(CMV|E1|N|U|W)_\w+__\w+", "a finite-support-set array of two families (N_c__v_task, ...)"),
        (r"(EA|BN|CVV|V)_\w+", "a finite-support-set array of one family (V_adapted, EA_c, ...)"),
        (r"D_\w+", "the tangent of a task-program array along a direction (D_V_s, derive/meta.py tangent)"),
        (r"(GG|Eqbb|Eqb|PS|BB)_\w*", "an array of the support-direction square (GG_adapted, PS_0, ...)"),
    )
)


def reserved_use(name: str) -> str | None:
    """Why ``name`` is reserved (a clause), or None if a model may use it."""
    if name in RESERVED:
        return RESERVED[name]
    for pattern, why in RESERVED_PATTERNS:
        if pattern.fullmatch(name):
            return why
    return None


def check_name(kind: str, name: str) -> None:
    """Raise ValueError if ``name`` cannot name a model's ``kind`` (parameter, vector, ...)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{kind} name {name!r} must be a Python identifier")
    why = reserved_use(name)
    if why is not None:
        raise ValueError(f"{kind} name {name!r} is reserved: {why}; choose another name")
