"""Official computations transcribed into PyTorch (the dev extra), for tests to compare jaxkd against."""
