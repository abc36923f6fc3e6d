"""Templates copied into Triton model repositories by qtale_export.deploy.triton (not imported here)."""
