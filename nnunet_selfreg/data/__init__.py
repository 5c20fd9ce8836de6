"""Datasets in nnU-Net's raw format: a synthetic generator (tests, offline fallback)."""
