"""Model plumbing: the embedded default model and calibration data."""
