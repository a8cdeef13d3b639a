"""The training area: the loop, the jitted steps, the optimizer, the mesh, checkpoints, curves and the
host's step memory."""
