"""The experiment as data: stage specs, profiles, the pipeline graph, recovery ratios, report.

Runs on the laptop; imports `state` only (no torch, no orchestrator).
"""
