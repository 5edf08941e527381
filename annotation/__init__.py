"""aerosynth annotation stage."""
