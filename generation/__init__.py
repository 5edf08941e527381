"""aerosynth generation stage."""
