"""runtime: integrate generated flows, simulate the networks they describe, plot both.

from runtime import flow, simulate, Init, sampled_init
init = sampled_init("two_layer", K=2, M=2, N=1000, seed=0)
traj = flow("two_layer", init, {"eta": 1.0}, t_max=10, dt=0.01)
traj.eps_g, traj.Q, traj.alpha
ds = sweep("spec.toml")  # an xarray.Dataset (docs/interface.md, Sweeps)
"""

from .init import Init, realise, sample_network, sampled_init
from .integrate import FlowDiverged, SimulationDiverged, flow
from .kernels import load, load_path
from .simulate import simulate
from .sweep import sweep
from .trajectory import Trajectory

__all__ = [
    "FlowDiverged",
    "Init",
    "SimulationDiverged",
    "Trajectory",
    "flow",
    "load",
    "load_path",
    "realise",
    "sample_network",
    "sampled_init",
    "simulate",
    "sweep",
]
