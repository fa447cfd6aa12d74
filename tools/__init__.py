"""Developer tools: benchmarks and set-ups run from the command line (not imported by ntonix)."""
