"""Model folder formats, one module each, imported one way: base (shared, TF-free) <- bundle (TF's
checkpoint files written without TF), openai (base, bundle), hf (base) <- gpt2.checkpoint (the front
door, whose FORMATS table picks a folder's format). A format module gives `claims(model_dir)`,
`read_hparams(model_dir)` and `open_weights(model_dir, skip_optimizer_slots)`: a base.Weights with
`hparams` and `read(name)` (OpenAI variable name -> float32 value of its variable_shapes shape)."""
