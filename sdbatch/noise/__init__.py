"""Initial and per-step noise, one stream per image, in the conventions other tools use: `philox` is
CUDA's generator on the CPU, `a1111` is A1111's per-image noise (variation seeds, seed resize, ENSD)."""
