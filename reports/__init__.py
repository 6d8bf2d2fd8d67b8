"""Rendering of check results: HTML, JSON and JUnit. Knows nothing about torch."""
