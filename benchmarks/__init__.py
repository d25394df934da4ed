"""Side-by-side benchmarks of difflayers against the libraries users pick today."""
