"""Layer solvers: pure functions of (weight, Hessian, grid, settings) returning a SolverResult."""

from .admmq import ADMMSettings, admmq
from .gptq import GPTQSettings, gptq
from .local_search import local_search
from .result import SolverResult
from .rtn import rtn

__all__ = ["ADMMSettings", "GPTQSettings", "SolverResult", "admmq", "gptq", "local_search", "rtn"]
