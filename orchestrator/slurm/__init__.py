"""Slurm clusters as targets: the sbatch job script (`jobscript`), submit/cancel (`submit`)."""
