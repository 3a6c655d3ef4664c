"""Developer tools (not part of the package): ahead-of-time compile reports, the config tuner, the
per-program probe, host-time profiles, the sharded GPU test runner and the GPU machine script."""
