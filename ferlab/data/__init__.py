"""Data: loaders for every FER layout, the embedded synthetic default, splits."""
