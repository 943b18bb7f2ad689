"""Measuring: metrics, evaluators, compound expressions, relatedness estimates, reports."""
