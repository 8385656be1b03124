"""Metric learning: losses (pure functions, chosen by name), miners, the projector head, samplers,
and the data-parallel gather that lets a loss see every rank's negatives."""
