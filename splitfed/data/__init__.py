"""Data: loaders (KDEF, folder per class, FER2013, synthetic), eye-region crop, partitioning."""
