"""aerosynth generation stage: a latent diffusion model fine-tuned on source and target tiles.

Modules:
    models:    ``build_ldm`` (presets ``tiny``/``cpu``), ``load_pretrained_sd``, ``save_ldm``/``load_ldm``.
    vocab:     the offline CLIP tokenizer and the learned tokens ([V1], ``<bg-DOMAIN>``).
    taef2:     the pretrained TAEF2 autoencoder as a torch module.
    attention: the cross-attention capture processor and the L_obj / L_bg losses.
    training:  ``train_stage("0"|"A"|"B"|"C", config, splits, out_dir)``.
    sampling:  ``generate_set`` (synthetic sets in shards) and ``translate_split``.

Import the submodules directly (``from generation.training import train_stage``); this package
file imports nothing heavy.
"""
