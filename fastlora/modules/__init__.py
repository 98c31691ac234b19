"""nn.Module-level pieces that :func:`fastlora.patch` installs: per-module forwards (PEFT LoRA layers,
fastlora's own LoRA, 4-bit linears, grouped projections, the NEFTune embedding). They call only
:mod:`fastlora.ops`; :mod:`fastlora.patch` decides which module gets which."""
