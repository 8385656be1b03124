"""The modular layer: adapters on a frozen base, mixtures of adapter experts, SMEAR, merging.

    inject.inject(model, cfg.adapters, domains, groups)   config -> adapters in the model (the trainer calls it)
    inject.set_active / set_per_domain / merge / attach   manage them by name
    io.save_adapters(model, dir)                          adapters alone: safetensors + manifest.json
    merge.run(...)                                        `moe-sys merge`: average, task arithmetic, TIES, DARE, upcycle

Nothing is imported here, so importing a submodule stays cheap; ``inject`` registers every adapter type.
See docs/modular.md.
"""
