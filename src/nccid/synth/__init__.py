"""Realistic synthetic hospitals, patients, clinical records and DICOM (no real patient data, ever)."""
