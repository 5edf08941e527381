"""aerosynth flows stage."""
