"""Statistical validation against simulated truth: coverage, SBC, calibration."""
