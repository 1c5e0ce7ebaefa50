"""The imperative shell over the core: sweeps to disk, figures, the command line and the app."""
