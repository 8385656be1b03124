"""Evaluation metrics beyond the LM loss: retrieval (Recall@K, MAP@R) for metric learning."""
