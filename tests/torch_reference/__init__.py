"""Official PyTorch model definitions transcribed for equal-logits tests (torch is a test-only dependency)."""
