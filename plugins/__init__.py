"""Skills shipped with chatforge; each is a plugin like any other."""
