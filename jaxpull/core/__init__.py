"""The method: gates (the backward rules), layers, the architectures, ``Model``, the settings
presets, and the pure, jittable pullback and ascent. Nothing here reads or writes files."""
