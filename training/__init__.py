"""Offline retraining and re-validation of the classifier the paper's way (see DESIGN.md).

May import ``model``; the running node never imports this package.
"""
