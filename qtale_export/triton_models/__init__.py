"""Templates copied into Triton model repositories by qtale_export.triton (not imported here)."""
