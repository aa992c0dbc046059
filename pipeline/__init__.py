"""Orchestration of the storygen pipeline: flags, run order, artifact folders and manifests."""
