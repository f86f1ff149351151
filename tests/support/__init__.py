"""Helpers shared by tests that drive real DICOM peers."""
