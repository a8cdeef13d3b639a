"""The training area: the loop, the jitted steps, the optimizer, the mesh, checkpoints and curves."""
