"""Targets: where runs execute. One seam (`Target`) that `local`, `ssh` and `vast` implement."""
