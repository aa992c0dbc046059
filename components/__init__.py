"""storygen's pipeline steps: one module per step, each a plain function of its inputs."""
