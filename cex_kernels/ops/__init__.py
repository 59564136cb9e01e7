"""Custom-op registration and autograd glue, one module per op family."""
