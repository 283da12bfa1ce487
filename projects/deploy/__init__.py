"""Exporting trained models for serving outside this package."""
