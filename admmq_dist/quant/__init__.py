"""The math layer: grids, packing, Hessians and solvers.

Tensors in, tensors out. Nothing here imports the model plumbing, the cluster code, or does I/O.
"""
