"""aerosynth detection stage."""
