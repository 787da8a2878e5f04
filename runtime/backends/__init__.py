"""Inference engines behind ``runtime.model.Model``; each imports its engine lazily."""
