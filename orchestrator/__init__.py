"""orch's controller: runs on the researcher's laptop. Never imports torch or transformers."""

__version__ = "0.1.0"
