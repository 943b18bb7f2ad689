"""Measuring: metrics, evaluators, compound expressions, relatedness tables, reports and comparisons."""
