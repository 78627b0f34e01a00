"""Test-bed part (being built)."""
