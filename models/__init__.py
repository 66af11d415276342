"""The reference Transformer and the needle-in-a-haystack study built on longattn."""
