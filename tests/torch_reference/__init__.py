"""Official PyTorch model definitions and loss computations transcribed for tests to compare jaxkd against
(torch is a test-only dependency, in the dev extra)."""
