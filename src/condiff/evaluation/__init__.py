"""Evaluation: sample-and-score, metrics, and the solver and editing benchmarks with their peers."""
