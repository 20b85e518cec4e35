"""runtime: integrate generated flows, simulate the networks they describe, plot both.

from runtime import flow, simulate, Init, sampled_init
init = sampled_init("two_layer", K=2, M=2, N=1000, seed=0)
traj = flow("two_layer", init, {"eta": 1.0}, t_max=10, dt=0.01)
traj.eps_g, traj.Q, traj.alpha

runtime.metatest(traj_of_anil, n_s=[1, 10, float("inf")])  # docs/interface.md
ds = sweep("spec.toml")  # an xarray.Dataset (docs/interface.md, Sweeps)
"""

from .analyze import analyze, summaries
from .init import Init, realise, sample_network, sampled_init
from .integrate import FlowDiverged, SimulationDiverged, flow
from .kernels import load, load_path
from .few_shot import MetaTest, metatest
from .simulate import simulate
from .sweep import sweep
from .trajectory import Trajectory

__all__ = [
    "FlowDiverged",
    "Init",
    "SimulationDiverged",
    "Trajectory",
    "analyze",
    "flow",
    "load",
    "load_path",
    "MetaTest",
    "metatest",
    "realise",
    "sample_network",
    "sampled_init",
    "simulate",
    "summaries",
    "sweep",
]
