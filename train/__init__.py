"""edgead training: EfficientAD (student-teacher + autoencoder) and PUAD, in plain PyTorch."""
