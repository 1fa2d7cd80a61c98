"""HDPO: Hybrid Distillation Policy Optimization (arXiv 2603.23871), a reproducible replication."""
__version__ = "0.1.0"
