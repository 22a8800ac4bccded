"""Experiment engine: specs, runs, the result store and the local and SLURM executors."""
