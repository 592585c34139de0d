"""Evaluation: verification protocols, 3D reconstruction error, fit quality, the HTML report, mesh export."""
