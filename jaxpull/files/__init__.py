"""Files: converted-model files, images in, safe output writes, and the cache of converted models."""
