"""What researchers touch: ls / sync / cat and the Python API."""
