"""histosynth: synthetic augmentation of histopathology datasets."""
