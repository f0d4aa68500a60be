"""Unlearning methods for models trained with a recorded GradientHistory; one module per method."""
