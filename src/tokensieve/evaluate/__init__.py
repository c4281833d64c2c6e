"""Measuring what pruning costs in accuracy and buys in speed."""
